//! Shared pieces of the `fuzz_` property tests (docs/testing.md): the case budget, byte
//! mutations of a valid document, and a configuration key that is absent, right or anything.

use proptest::prelude::*;
use serde_json::Value;

/// proptest's configuration for a property: `cases` cases, unless `PROPTEST_CASES` is set
/// (proptest's default configuration reads it, for long runs); failures are not persisted to
/// files in the tree (a regression found is kept as a plain unit test).
pub fn config(cases: u32) -> ProptestConfig {
    let mut c = ProptestConfig::default();
    if std::env::var_os("PROPTEST_CASES").is_none() {
        c.cases = cases;
    }
    c.failure_persistence = None;
    c
}

/// Up to six (position, operation, byte) edits: operation 0 overwrites, 1 inserts, 2 deletes.
pub fn mutations() -> impl Strategy<Value = Vec<(usize, u8, u8)>> {
    prop::collection::vec((any::<usize>(), 0u8..3, any::<u8>()), 0..6)
}

/// Applies [`mutations`] to `doc` (positions wrap around its length).
pub fn mutate(mut doc: Vec<u8>, m: &[(usize, u8, u8)]) -> Vec<u8> {
    for &(pos, op, b) in m {
        let at = pos % (doc.len() + 1);
        match op {
            0 if at < doc.len() => doc[at] = b,
            1 => doc.insert(at, b),
            _ if at < doc.len() => {
                doc.remove(at);
            }
            _ => {}
        }
    }
    doc
}

/// A configuration key: left out, given a value the parser must accept, or given anything.
#[derive(Debug, Clone)]
pub enum Field {
    Absent,
    Good,
    Any(Value),
}

/// A [`Field`]: absent 1 time in `1 + good + 2`, good `good` times, else a value of `any`.
pub fn field(good: u32, any: impl Strategy<Value = Value> + 'static) -> BoxedStrategy<Field> {
    prop_oneof![
        1 => Just(Field::Absent),
        good => Just(Field::Good),
        2 => any.prop_map(Field::Any),
    ]
    .boxed()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mutate_overwrites_inserts_and_deletes() {
        assert_eq!(mutate(b"abc".to_vec(), &[(1, 0, b'X')]), b"aXc");
        assert_eq!(mutate(b"abc".to_vec(), &[(3, 1, b'X')]), b"abcX");
        assert_eq!(mutate(b"abc".to_vec(), &[(0, 2, 0)]), b"bc");
        assert_eq!(mutate(Vec::new(), &[(9, 2, 0), (9, 0, 1)]), b"");
    }
}
