//! Building task instances: needles placed at depths in filler sized to a token target.

use std::collections::{HashMap, HashSet};
use std::ops::Range;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use crate::error::{Error, Result};
use crate::filler::{Filler, Units};
use crate::spec::TaskSpec;

/// One point of an evaluation grid: prompt length in tokens, needle depth, seed.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct GridPoint {
    /// Target prompt length in tokens of the caller's tokenizer.
    pub length: usize,
    /// Depth of the (first) needle in the haystack: 0.0 = start, 1.0 = end.
    pub depth: f64,
    /// Seed of the random needles (numbers, keys, variable names) and filler.
    pub seed: u64,
}

/// Every combination of `lengths × depths × seeds`, in that nesting order (length outermost).
pub fn grid(lengths: &[usize], depths: &[f64], seeds: &[u64]) -> Vec<GridPoint> {
    lengths
        .iter()
        .flat_map(|&length| {
            depths.iter().flat_map(move |&depth| seeds.iter().map(move |&seed| GridPoint { length, depth, seed }))
        })
        .collect()
}

/// What an instance is and how it was made.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct TaskMeta {
    /// The canonical task spec, e.g. `niah_multikey:keys=4`.
    pub task: String,
    /// Requested prompt length in tokens.
    pub target_tokens: usize,
    /// Prompt length as the token counter measured it (within about 1% of the target).
    pub prompt_tokens: usize,
    /// Requested depth of the first needle, in `[0, 1]`.
    pub depth: f64,
    /// The seed.
    pub seed: u64,
    /// The filler kind: `landmark`, `sentences` or `text`.
    pub filler: String,
    /// Byte range of the haystack (filler and needles) within the prompt.
    pub context: Range<usize>,
    /// Byte range of the first needle (the one placed at `depth`) within the prompt.
    pub needle: Range<usize>,
}

/// One prompt with its answers.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct TaskInstance {
    /// A stable name: `task/length/dDEPTH%/sSEED`.
    pub id: String,
    /// The prompt: instructions, haystack, then the question ending in an answer prefix
    /// ("... The pass key is"), so a greedy continuation starts with the answer.
    pub prompt: String,
    /// The answer as text (expected answers joined by `, ` for multi-answer tasks).
    pub answer: String,
    /// Every answer that must appear in the generation (one for single-answer tasks).
    pub expected: Vec<String>,
    /// How the instance was made.
    pub meta: TaskMeta,
}

/// A needle: text to hide at a depth of the haystack.
struct Needle {
    depth: f64,
    text: String,
    /// The needle placed at the requested depth (the first one a layout lists).
    primary: bool,
}

/// A task's fixed text, before filler.
struct Layout {
    header: String,
    needles: Vec<Needle>,
    question: String,
    expected: Vec<String>,
}

const PASSKEY_HEADER: &str = "There is an important info hidden inside a lot of irrelevant text. \
Find it and memorize them. I will quiz you about the important information there.";
const NIAH_HEADER: &str = "Some special magic numbers are hidden within the following text. \
Make sure to memorize it. I will quiz you about the numbers afterwards.";
const VT_HEADER: &str = "Memorize and track the chain(s) of variable assignment hidden in the following text.";

const KEY_ADJECTIVES: &[&str] = &[
    "ancient", "brave", "clever", "curious", "damp", "eager", "fancy", "gentle", "hollow", "icy", "jolly", "lazy",
    "lucky", "mellow", "noisy", "odd", "proud", "rapid", "rustic", "shiny", "silent", "tidy", "vast", "wild",
];
const KEY_NOUNS: &[&str] = &[
    "anchor", "badger", "candle", "dragon", "engine", "falcon", "garden", "harbor", "island", "jacket", "kettle",
    "lantern", "meadow", "needle", "orchard", "pebble", "quarry", "rocket", "saddle", "thistle", "tunnel", "violin",
    "walrus", "zephyr",
];

/// `n` distinct values drawn by `draw`.
fn distinct<T: Eq + std::hash::Hash + Clone>(n: usize, mut draw: impl FnMut() -> T) -> Vec<T> {
    let mut seen = HashSet::new();
    let mut out = Vec::with_capacity(n);
    while out.len() < n {
        let v = draw();
        if seen.insert(v.clone()) {
            out.push(v);
        }
    }
    out
}

fn numbers(rng: &mut StdRng, n: usize, digits: u32) -> Vec<String> {
    let (lo, hi) = (10u64.pow(digits - 1), 10u64.pow(digits));
    distinct(n, || rng.random_range(lo..hi)).into_iter().map(|v| v.to_string()).collect()
}

fn keys(rng: &mut StdRng, n: usize) -> Vec<String> {
    distinct(n, || {
        let a = KEY_ADJECTIVES[rng.random_range(0..KEY_ADJECTIVES.len())];
        let b = KEY_NOUNS[rng.random_range(0..KEY_NOUNS.len())];
        format!("{a}-{b}")
    })
}

fn var_names(rng: &mut StdRng, n: usize) -> Vec<String> {
    distinct(n, || (0..5).map(|_| char::from(b'A' + rng.random_range(0..26u8))).collect::<String>())
}

fn niah_needle(key: &str, value: &str) -> String {
    format!("One of the special magic numbers for {key} is: {value}.")
}

/// "a", "a and b", "a, b and c".
fn and_list(items: &[String]) -> String {
    match items {
        [] => String::new(),
        [one] => one.clone(),
        [init @ .., last] => format!("{} and {last}", init.join(", ")),
    }
}

impl TaskSpec {
    fn layout(&self, depth: f64, rng: &mut StdRng) -> Layout {
        let needle = |depth: f64, text: String| Needle { depth, text, primary: false };
        match *self {
            TaskSpec::Passkey => {
                let k = numbers(rng, 1, 5).remove(0);
                Layout {
                    header: PASSKEY_HEADER.into(),
                    needles: vec![needle(depth, format!("The pass key is {k}. Remember it. {k} is the pass key."))],
                    question: "What is the pass key? The pass key is".into(),
                    expected: vec![k],
                }
            }
            TaskSpec::NiahSingle | TaskSpec::NiahMultikey { .. } => {
                let n = match *self {
                    TaskSpec::NiahMultikey { keys } => keys,
                    _ => 1,
                };
                let (ks, vs) = (keys(rng, n), numbers(rng, n, 7));
                let needles = ks
                    .iter()
                    .zip(&vs)
                    .enumerate()
                    .map(|(i, (k, v))| needle(if i == 0 { depth } else { rng.random() }, niah_needle(k, v)))
                    .collect();
                let k = &ks[0];
                Layout {
                    header: NIAH_HEADER.into(),
                    needles,
                    question: format!(
                        "What is the special magic number for {k} mentioned in the provided text? \
                         The special magic number for {k} mentioned in the provided text is"
                    ),
                    expected: vec![vs[0].clone()],
                }
            }
            TaskSpec::NiahMultivalue { values } => {
                let k = keys(rng, 1).remove(0);
                let vs = numbers(rng, values, 7);
                let needles = vs
                    .iter()
                    .enumerate()
                    .map(|(i, v)| needle(if i == 0 { depth } else { rng.random() }, niah_needle(&k, v)))
                    .collect();
                Layout {
                    header: NIAH_HEADER.into(),
                    needles,
                    question: format!(
                        "What are all the special magic numbers for {k} mentioned in the provided text? \
                         The special magic numbers for {k} mentioned in the provided text are"
                    ),
                    expected: vs,
                }
            }
            TaskSpec::NiahMultiquery { queries } => {
                let (ks, vs) = (keys(rng, queries), numbers(rng, queries, 7));
                let needles = ks
                    .iter()
                    .zip(&vs)
                    .enumerate()
                    .map(|(i, (k, v))| needle(if i == 0 { depth } else { rng.random() }, niah_needle(k, v)))
                    .collect();
                let all = and_list(&ks);
                Layout {
                    header: NIAH_HEADER.into(),
                    needles,
                    question: format!(
                        "What are all the special magic numbers for {all} mentioned in the provided text? \
                         The special magic numbers for {all} mentioned in the provided text are"
                    ),
                    expected: vs,
                }
            }
            TaskSpec::VariableTracking { chains, hops } => {
                let names = var_names(rng, chains * (hops + 1));
                let values = numbers(rng, chains, 5);
                let mut needles = Vec::new();
                for (c, (vars, value)) in names.chunks(hops + 1).zip(&values).enumerate() {
                    // The asked chain starts at `depth` and spreads evenly to the end; the
                    // distractor chains sit at sorted random depths.
                    let depths: Vec<f64> = if c == 0 {
                        (0..=hops).map(|i| depth + (1.0 - depth) * i as f64 / hops as f64).collect()
                    } else {
                        let mut d: Vec<f64> = (0..=hops).map(|_| rng.random()).collect();
                        d.sort_by(f64::total_cmp);
                        d
                    };
                    for (i, (var, d)) in vars.iter().zip(depths).enumerate() {
                        let rhs = if i == 0 { value.clone() } else { format!("VAR {}", vars[i - 1]) };
                        needles.push(needle(d, format!("VAR {var} = {rhs}.")));
                    }
                }
                let value = &values[0];
                // RULER's answer prefix ends at "they are:"; a 135M model then starts a list of
                // filler sentences. Ending on "VAR" makes its greedy continuation a variable name.
                Layout {
                    header: VT_HEADER.into(),
                    needles,
                    question: format!(
                        "Question: Find all variables that are assigned the value {value} in the text above. \
                         Answer: According to the chain(s) of variable assignment in the text above, {} variables \
                         are assigned the value {value}, they are: VAR",
                        hops + 1
                    ),
                    expected: names[..=hops].to_vec(),
                }
            }
        }
    }

    /// Builds the instance at `point`: a prompt of about `point.length` tokens as
    /// `count_tokens` counts them (within about 1% for a BPE tokenizer, exactly for an
    /// additive counter), with the first needle at `point.depth` of the haystack.
    ///
    /// Errors when the depth is not a fraction in `[0, 1]`, the length is too short for the
    /// task's fixed text, or the filler text is empty.
    ///
    /// ```
    /// use needle_tasks::{Filler, GridPoint, TaskSpec};
    /// let words = |s: &str| s.split_whitespace().count();
    /// let spec: TaskSpec = "passkey".parse()?;
    /// let inst = spec.instance(GridPoint { length: 500, depth: 0.5, seed: 7 }, &Filler::Landmark, &words)?;
    /// assert!(inst.prompt.ends_with("The pass key is"));
    /// assert!(inst.prompt.contains(&format!("The pass key is {}.", inst.answer)));
    /// # Ok::<(), needle_tasks::Error>(())
    /// ```
    pub fn instance(
        &self,
        point: GridPoint,
        filler: &Filler,
        count_tokens: &dyn Fn(&str) -> usize,
    ) -> Result<TaskInstance> {
        self.validate()?;
        let GridPoint { length, depth, seed } = point;
        if !(0.0..=1.0).contains(&depth) {
            return Err(Error::invalid("depth", format!("{depth} is not a fraction in [0, 1] (0.5 = 50%)")));
        }
        if length == 0 {
            return Err(Error::invalid("length", "must be at least one token"));
        }
        let mut rng = StdRng::seed_from_u64(seed);
        let mut layout = self.layout(depth, &mut rng);
        if let Some(first) = layout.needles.first_mut() {
            first.primary = true;
        }
        let mut units = Units::new(filler, &mut rng)?;

        let needle_tokens: Vec<usize> = layout.needles.iter().map(|n| count_tokens(&format!(" {}", n.text))).collect();
        let fixed = count_tokens(&format!("{}\n\n\n\n{}", layout.header, layout.question))
            + needle_tokens.iter().sum::<usize>();
        if fixed >= length {
            return Err(Error::TooShort { task: self.to_string(), target: length, needed: fixed });
        }
        // Stable sort: needles at one depth keep their order (a chain stays in order).
        layout.needles.sort_by(|a, b| a.depth.total_cmp(&b.depth));

        // Filler units and their token counts, drawn lazily from the seeded stream.
        let (mut texts, mut counts): (Vec<String>, Vec<usize>) = (Vec::new(), Vec::new());
        let mut cache: HashMap<String, usize> = HashMap::new();
        let repetitive = units.repetitive();
        let mut budget = (length - fixed) as i64;
        let mut best: Option<(usize, String, Range<usize>, Range<usize>)> = None;
        let tolerance = (length / 100).max(2);
        for _ in 0..6 {
            // Take units while that brings the filler closer to the budget.
            let (mut n, mut sum) = (0usize, 0i64);
            loop {
                if n == texts.len() {
                    // Every unit holds a word; a counter that finds no tokens in them would never fill.
                    if (n > 16 + 4 * length && sum == 0) || n > 16 + 64 * length {
                        return Err(Error::invalid("count_tokens", "counts no tokens in the filler text"));
                    }
                    let u = units.next_unit(&mut rng);
                    let c = match cache.get(&u) {
                        Some(&c) => c,
                        None => {
                            let c = count_tokens(&format!(" {u}"));
                            if repetitive {
                                cache.insert(u.clone(), c);
                            }
                            c
                        }
                    };
                    texts.push(u);
                    counts.push(c);
                }
                let c = counts[n] as i64;
                if sum + c > budget && (sum + c - budget) >= (budget - sum) {
                    break;
                }
                sum += c;
                n += 1;
            }
            let (prompt, context, needle) = assemble(&layout, &texts[..n], &counts[..n]);
            let got = count_tokens(&prompt);
            let err = got.abs_diff(length);
            if best.as_ref().is_none_or(|b| err < b.0.abs_diff(length)) {
                best = Some((got, prompt, context, needle));
            }
            if err <= tolerance {
                break;
            }
            budget += length as i64 - got as i64;
        }
        let Some((prompt_tokens, prompt, context, needle)) = best else {
            return Err(Error::invalid("length", "no prompt could be assembled"));
        };
        let task = self.to_string();
        Ok(TaskInstance {
            id: format!("{task}/{length}/d{:.0}/s{seed}", depth * 100.0),
            prompt,
            answer: layout.expected.join(", "),
            expected: layout.expected,
            meta: TaskMeta {
                task,
                target_tokens: length,
                prompt_tokens,
                depth,
                seed,
                filler: filler.kind().into(),
                context,
                needle,
            },
        })
    }

    /// Builds one instance per grid point.
    pub fn instances(
        &self,
        points: &[GridPoint],
        filler: &Filler,
        count_tokens: &dyn Fn(&str) -> usize,
    ) -> Result<Vec<TaskInstance>> {
        points.iter().map(|&p| self.instance(p, filler, count_tokens)).collect()
    }
}

/// Joins header, haystack (filler units with needles placed by depth in filler tokens) and
/// question. Returns the prompt, the haystack's byte range and the first needle's byte range.
fn assemble(layout: &Layout, texts: &[String], counts: &[usize]) -> (String, Range<usize>, Range<usize>) {
    let total: usize = counts.iter().sum();
    // Insertion slot of each needle: the unit boundary whose token prefix is nearest depth·total.
    let mut prefix = Vec::with_capacity(counts.len() + 1);
    prefix.push(0usize);
    for &c in counts {
        prefix.push(prefix[prefix.len() - 1] + c);
    }
    let slot = |depth: f64| -> usize {
        let want = depth * total as f64;
        let i = prefix.partition_point(|&p| (p as f64) < want);
        if i > 0 && (want - prefix[i - 1] as f64) < (prefix.get(i).map_or(f64::INFINITY, |&p| p as f64) - want) {
            i - 1
        } else {
            i.min(texts.len())
        }
    };
    let slots: Vec<usize> = layout.needles.iter().map(|n| slot(n.depth)).collect();
    let mut prompt = String::with_capacity(layout.header.len() + layout.question.len() + texts.len() * 24);
    prompt.push_str(&layout.header);
    prompt.push_str("\n\n");
    let context_start = prompt.len();
    let mut needle_range = 0..0;
    let mut k = 0;
    let piece = |prompt: &mut String, s: &str| -> Range<usize> {
        if prompt.len() > context_start {
            prompt.push(' ');
        }
        let start = prompt.len();
        prompt.push_str(s);
        start..prompt.len()
    };
    for i in 0..=texts.len() {
        while k < slots.len() && slots[k] == i {
            let r = piece(&mut prompt, &layout.needles[k].text);
            if layout.needles[k].primary {
                needle_range = r;
            }
            k += 1;
        }
        if let Some(t) = texts.get(i) {
            piece(&mut prompt, t);
        }
    }
    let context = context_start..prompt.len();
    prompt.push_str("\n\n");
    prompt.push_str(&layout.question);
    (prompt, context, needle_range)
}
