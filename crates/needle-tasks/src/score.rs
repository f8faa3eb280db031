//! Scoring a generation against an instance.

use crate::build::TaskInstance;
use crate::spec::{Metric, TaskSpec};

/// Scores `generated` (the model's continuation of `instance.prompt`) for `task`, in `[0, 1]`.
///
/// - passkey, `niah_single`, `niah_multikey`: exact match of the first number generated.
/// - `niah_multivalue`, `niah_multiquery`, `variable_tracking`: the share of expected answers
///   that appear in the generation as whole words, case-insensitively (RULER's
///   "string match all").
///
/// ```
/// use needle_tasks::{Filler, GridPoint, TaskSpec, score};
/// let words = |s: &str| s.split_whitespace().count();
/// let spec: TaskSpec = "passkey".parse()?;
/// let inst = spec.instance(GridPoint { length: 300, depth: 0.2, seed: 1 }, &Filler::Landmark, &words)?;
/// assert_eq!(score(&spec, &format!(" {}. Remember it.", inst.answer), &inst), 1.0);
/// assert_eq!(score(&spec, " 12345.", &inst), if inst.answer == "12345" { 1.0 } else { 0.0 });
/// # Ok::<(), needle_tasks::Error>(())
/// ```
pub fn score(task: &TaskSpec, generated: &str, instance: &TaskInstance) -> f64 {
    match task.metric() {
        Metric::ExactFirstNumber => exact_first_number(generated, &instance.answer),
        Metric::RecallAll => recall_all(generated, &instance.expected),
    }
}

/// 1 when the first run of ASCII digits in `generated` equals `answer`, else 0.
pub fn exact_first_number(generated: &str, answer: &str) -> f64 {
    let first = generated.split(|c: char| !c.is_ascii_digit()).find(|s| !s.is_empty());
    if first == Some(answer.trim()) { 1.0 } else { 0.0 }
}

/// The share of `expected` found among the whole words (alphanumeric runs) of `generated`,
/// case-insensitively; 0 when nothing is expected.
pub fn recall_all(generated: &str, expected: &[String]) -> f64 {
    if expected.is_empty() {
        return 0.0;
    }
    let words: std::collections::HashSet<String> =
        generated.split(|c: char| !c.is_alphanumeric()).filter(|w| !w.is_empty()).map(str::to_lowercase).collect();
    let hits = expected.iter().filter(|e| words.contains(&e.trim().to_lowercase())).count();
    hits as f64 / expected.len() as f64
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn first_number_must_match_exactly() {
        assert_eq!(exact_first_number(" 71432. Remember it.", "71432"), 1.0);
        assert_eq!(exact_first_number("71432", "71432"), 1.0);
        assert_eq!(exact_first_number(" 714321", "71432"), 0.0);
        assert_eq!(exact_first_number(" 12345 or 71432", "71432"), 0.0);
        assert_eq!(exact_first_number(" not given", "71432"), 0.0);
        assert_eq!(exact_first_number("", "71432"), 0.0);
    }

    #[test]
    fn recall_counts_whole_words() {
        let exp: Vec<String> = ["ABCDE", "FGHIJ", "KLMNO", "PQRST"].map(String::from).to_vec();
        assert_eq!(recall_all(" ABCDE, FGHIJ, KLMNO, PQRST.", &exp), 1.0);
        assert_eq!(recall_all(" abcde fghij", &exp), 0.5);
        assert_eq!(recall_all(" ABCDEF FGHI", &exp), 0.0);
        assert_eq!(recall_all("", &exp), 0.0);
        assert_eq!(recall_all("x", &[]), 0.0);
    }
}
