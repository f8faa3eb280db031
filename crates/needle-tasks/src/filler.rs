//! Filler ("haystack") text: the canonical Landmark sentences, seeded varied sentences, or a
//! text passed in (e.g. a public-domain book), cut into short sentence units.

use std::sync::Arc;

use rand::Rng;
use rand::rngs::StdRng;

use crate::error::{Error, Result};

/// Landmark Attention's filler, repeated: "The grass is green. ..." (also RULER's noise haystack).
pub const LANDMARK: [&str; 5] =
    ["The grass is green.", "The sky is blue.", "The sun is yellow.", "Here we go.", "There and back again."];

const NOUNS: &[&str] = &[
    "grass", "sky", "sun", "sea", "road", "house", "tree", "river", "cloud", "field", "hill", "stone", "bird", "door",
    "garden", "wind", "lake", "bridge", "forest", "valley",
];
const ADJECTIVES: &[&str] = &[
    "green", "blue", "yellow", "quiet", "warm", "old", "tall", "wide", "calm", "bright", "cold", "soft", "long",
    "still", "grey", "far", "small", "deep", "slow", "clear",
];

/// Longest unit cut from a text, in words: short units let needles sit close to any depth.
const MAX_UNIT_WORDS: usize = 24;

/// Where filler text comes from.
#[derive(Debug, Clone, PartialEq)]
pub enum Filler {
    /// The five [`LANDMARK`] sentences repeated in order (the seed does not change them).
    Landmark,
    /// Seeded sentences in the same style ("The river is calm. Here we go. ..."), so the
    /// haystack is not perfectly periodic.
    Sentences,
    /// A text (e.g. a book), whitespace-normalised and cut into sentences of at most 24 words;
    /// each instance starts at a seeded sentence and wraps around. A Project Gutenberg header
    /// and licence (outside the `*** START OF` / `*** END OF` lines) are left out.
    Text(Arc<str>),
}

impl Filler {
    /// Filler from a text.
    pub fn text(text: impl Into<Arc<str>>) -> Self {
        Filler::Text(text.into())
    }

    /// A short name for metadata: `landmark`, `sentences` or `text`.
    pub fn kind(&self) -> &'static str {
        match self {
            Filler::Landmark => "landmark",
            Filler::Sentences => "sentences",
            Filler::Text(_) => "text",
        }
    }
}

/// An endless, seeded stream of filler units.
pub(crate) enum Units {
    Landmark(usize),
    Sentences,
    Text { units: Vec<String>, next: usize },
}

impl Units {
    pub(crate) fn new(filler: &Filler, rng: &mut StdRng) -> Result<Self> {
        Ok(match filler {
            Filler::Landmark => Units::Landmark(0),
            Filler::Sentences => Units::Sentences,
            Filler::Text(t) => {
                let units = split_units(gutenberg_body(t));
                if units.is_empty() {
                    return Err(Error::EmptyFiller);
                }
                let next = rng.random_range(0..units.len());
                Units::Text { units, next }
            }
        })
    }

    /// True when units repeat often enough that caching their token counts pays.
    pub(crate) fn repetitive(&self) -> bool {
        !matches!(self, Units::Text { .. })
    }

    pub(crate) fn next_unit(&mut self, rng: &mut StdRng) -> String {
        match self {
            Units::Landmark(i) => {
                let s = LANDMARK[*i % LANDMARK.len()];
                *i += 1;
                s.to_string()
            }
            Units::Sentences => match rng.random_range(0..8) {
                0 => "Here we go.".to_string(),
                1 => "There and back again.".to_string(),
                _ => {
                    let n = NOUNS[rng.random_range(0..NOUNS.len())];
                    let a = ADJECTIVES[rng.random_range(0..ADJECTIVES.len())];
                    format!("The {n} is {a}.")
                }
            },
            Units::Text { units, next } => {
                let s = units[*next].clone();
                *next = (*next + 1) % units.len();
                s
            }
        }
    }
}

/// The part of a Project Gutenberg text between its `*** START OF` and `*** END OF` lines
/// (the whole text when it has no such markers).
fn gutenberg_body(text: &str) -> &str {
    let start = text.find("*** START OF").map_or(0, |i| text[i..].find('\n').map_or(text.len(), |j| i + j + 1));
    let end = text[start..].find("*** END OF").map_or(text.len(), |i| start + i);
    &text[start..end]
}

/// Cuts `text` into units: sentences (ending in `.`, `!` or `?`, optionally followed by
/// closing quotes or brackets), split further every [`MAX_UNIT_WORDS`] words.
fn split_units(text: &str) -> Vec<String> {
    let mut units = Vec::new();
    let mut cur: Vec<&str> = Vec::new();
    for w in text.split_whitespace() {
        cur.push(w);
        let end = w.trim_end_matches(['"', '\'', ')', ']', '\u{201d}', '\u{2019}', '_']);
        if end.ends_with(['.', '!', '?']) || cur.len() >= MAX_UNIT_WORDS {
            units.push(cur.join(" "));
            cur.clear();
        }
    }
    if !cur.is_empty() {
        units.push(cur.join(" "));
    }
    units
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;

    #[test]
    fn texts_split_into_short_sentences() {
        let u = split_units("It is a truth.  \"Is it?\" she said!\n\nYes — a b c");
        assert_eq!(u, vec!["It is a truth.", "\"Is it?\"", "she said!", "Yes — a b c"]);
        let long = "w ".repeat(60);
        assert!(split_units(&long).iter().all(|s| s.split_whitespace().count() <= MAX_UNIT_WORDS));
        let mut rng = StdRng::seed_from_u64(0);
        assert!(matches!(Units::new(&Filler::text("  \n "), &mut rng), Err(Error::EmptyFiller)));
    }

    #[test]
    fn gutenberg_boilerplate_is_left_out() {
        let t = "Licence words.\n*** START OF THE PROJECT GUTENBERG EBOOK X ***\nStory.\n*** END OF THE PROJECT\nMore licence.";
        assert_eq!(gutenberg_body(t).trim(), "Story.");
        assert_eq!(gutenberg_body("Just a story."), "Just a story.");
    }

    #[test]
    fn landmark_repeats_in_order() {
        let mut rng = StdRng::seed_from_u64(0);
        let mut u = Units::new(&Filler::Landmark, &mut rng).unwrap();
        let got: Vec<String> = (0..6).map(|_| u.next_unit(&mut rng)).collect();
        assert_eq!(got[0], LANDMARK[0]);
        assert_eq!(got[5], LANDMARK[0]);
        assert_eq!(got[4], LANDMARK[4]);
    }
}
