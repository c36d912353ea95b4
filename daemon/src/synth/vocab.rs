//! A SentencePiece-style ("llama") vocabulary that tokenizes any text: `<unk>`, `<s>`,
//! `</s>`, the 256 byte tokens `<0x00>`..`<0xFF>` (byte fallback for anything else, e.g.
//! unicode), then normal pieces. Every multi-character piece is reachable by SPM's
//! pairwise merges (each is a shorter piece plus one character), pieces are unique, and
//! earlier pieces score higher.

use std::collections::HashSet;

/// `tokenizer.ggml.token_type` values (`enum llama_token_type`).
pub const TYPE_NORMAL: i32 = 1;
/// Unknown-token type.
pub const TYPE_UNKNOWN: i32 = 2;
/// Control-token type.
pub const TYPE_CONTROL: i32 = 3;
/// Byte-token type.
pub const TYPE_BYTE: i32 = 6;

/// Id of `<unk>`.
pub const UNK_ID: u32 = 0;
/// Id of `<s>`.
pub const BOS_ID: u32 = 1;
/// Id of `</s>`.
pub const EOS_ID: u32 = 2;
/// Number of leading non-text tokens (3 specials + 256 bytes).
pub const N_SPECIAL_AND_BYTES: u32 = 3 + 256;

/// SentencePiece's whitespace marker.
const SPACE: &str = "\u{2581}";

/// Smallest vocabulary: specials, bytes, "▁", the printable ASCII characters alone and
/// with a leading "▁".
pub const MIN_VOCAB: u32 = N_SPECIAL_AND_BYTES + 1 + 94 + 94;
/// Largest vocabulary the generator makes.
pub const MAX_VOCAB: u32 = 1 << 20;

/// Common English words (their "▁"-prefixed prefixes become pieces).
const WORDS: &[&str] = &[
    "the", "of", "and", "to", "in", "is", "that", "for", "it", "as", "was", "with", "be", "by",
    "on", "not", "he", "this", "are", "or", "his", "from", "at", "which", "but", "have", "an",
    "had", "they", "you", "were", "their", "one", "all", "we", "can", "her", "has", "there",
    "been", "if", "more", "when", "will", "would", "who", "so", "no", "hello", "world", "model",
    "expert", "token", "memory", "cache", "layer", "what", "about", "out", "up", "into", "time",
    "only", "new", "some", "could", "these", "two", "may", "first", "then", "do", "any", "like",
    "my", "now", "over", "such", "our", "man", "me", "even", "most", "made", "after", "also",
    "did", "many", "before", "must", "through", "back", "years", "where", "much", "your", "way",
    "well", "down", "should", "because", "each", "just", "those", "people", "how", "too", "little",
    "state", "good", "very", "make", "world", "still", "own", "see", "men", "work", "long", "get",
    "here", "between", "both", "life", "being", "under", "never", "day", "same", "another", "know",
    "while", "last", "might", "us", "great", "old", "year", "off", "come", "since", "against",
    "go", "came", "right", "used", "take", "three", "number", "once", "Hello", "The", "This", "It",
    "In", "We", "What", "How", "Why", "When",
];

/// One vocabulary entry.
#[derive(Clone, Debug, PartialEq)]
pub struct Piece {
    /// The piece text (`▁` for a space).
    pub text: String,
    /// SentencePiece score (higher merges first).
    pub score: f32,
    /// `tokenizer.ggml.token_type`.
    pub token_type: i32,
}

/// The first `n` pieces (MIN_VOCAB <= n <= MAX_VOCAB; callers validate).
pub fn build(n: u32) -> Vec<Piece> {
    let n = n as usize;
    let mut out: Vec<Piece> = Vec::with_capacity(n);
    let mut seen: HashSet<String> = HashSet::with_capacity(n);
    let mut push = |out: &mut Vec<Piece>, text: String, token_type: i32| {
        if out.len() < n && seen.insert(text.clone()) {
            let score = if token_type == TYPE_NORMAL {
                -(out.len() as f32)
            } else {
                0.0
            };
            out.push(Piece {
                text,
                score,
                token_type,
            });
        }
    };
    push(&mut out, "<unk>".into(), TYPE_UNKNOWN);
    push(&mut out, "<s>".into(), TYPE_CONTROL);
    push(&mut out, "</s>".into(), TYPE_CONTROL);
    for b in 0..=255u8 {
        push(&mut out, format!("<0x{b:02X}>"), TYPE_BYTE);
    }
    push(&mut out, SPACE.into(), TYPE_NORMAL);
    let printable: Vec<char> = (0x21u8..=0x7e).map(char::from).collect();
    for &c in &printable {
        push(&mut out, c.to_string(), TYPE_NORMAL);
    }
    for &c in &printable {
        push(&mut out, format!("{SPACE}{c}"), TYPE_NORMAL);
    }
    for w in WORDS {
        let full = format!("{SPACE}{w}");
        // Every prefix with at least two characters: each is the previous one plus a char.
        let ends: Vec<usize> = full.char_indices().map(|(i, _)| i).skip(2).collect();
        for end in ends.into_iter().chain(std::iter::once(full.len())) {
            push(&mut out, full[..end].to_string(), TYPE_NORMAL);
        }
    }
    // Then lowercase n-grams of growing length, plain and "▁"-prefixed: each is reachable
    // from the (n-1)-gram before it (all of which come first).
    let mut len = 2;
    while out.len() < n {
        let mut gram = vec![b'a'; len];
        loop {
            let s = String::from_utf8_lossy(&gram).into_owned();
            push(&mut out, s.clone(), TYPE_NORMAL);
            push(&mut out, format!("{SPACE}{s}"), TYPE_NORMAL);
            if out.len() >= n || !next_gram(&mut gram) {
                break;
            }
        }
        len += 1;
    }
    out
}

/// Advances a lowercase string like an odometer; false when it wraps around.
fn next_gram(g: &mut [u8]) -> bool {
    for c in g.iter_mut().rev() {
        if *c < b'z' {
            *c += 1;
            return true;
        }
        *c = b'a';
    }
    false
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layout_and_uniqueness() {
        for n in [MIN_VOCAB, 1024, 4096, 40_000] {
            let v = build(n);
            assert_eq!(v.len(), n as usize);
            let set: HashSet<&str> = v.iter().map(|p| p.text.as_str()).collect();
            assert_eq!(set.len(), v.len(), "pieces must be unique");
            assert_eq!(v[0].text, "<unk>");
            assert_eq!(v[1].text, "<s>");
            assert_eq!(v[2].text, "</s>");
            assert_eq!(v[3].text, "<0x00>");
            assert_eq!(v[3 + 0x0a].text, "<0x0A>");
            assert_eq!(v[258].text, "<0xFF>");
            assert!(v[3..259].iter().all(|p| p.token_type == TYPE_BYTE));
            assert!(v[259..].iter().all(|p| p.token_type == TYPE_NORMAL));
        }
    }

    #[test]
    fn every_piece_is_reachable_by_merges() {
        let v = build(8192);
        let set: HashSet<&str> = v.iter().map(|p| p.text.as_str()).collect();
        for p in &v[259..] {
            let chars: Vec<char> = p.text.chars().collect();
            if chars.len() > 1 {
                let prefix: String = chars[..chars.len() - 1].iter().collect();
                assert!(
                    set.contains(prefix.as_str()),
                    "{} has no prefix piece",
                    p.text
                );
            }
        }
    }
}
