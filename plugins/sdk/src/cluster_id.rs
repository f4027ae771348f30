//! The form of a cluster id, as `wit/metadata.wit`'s `claim-cluster-id`
//! states it: the host checks configs and plugins' answers with it, and
//! metadata plugins check what they are asked to store and what they read
//! back.

/// Longest cluster id.
pub const MAX_CLUSTER_ID: usize = 64;

/// A cluster id is 1 to [`MAX_CLUSTER_ID`] characters of `[A-Za-z0-9_-]`:
/// it is written into file names, keys and error messages.
pub fn check_cluster_id(id: &str) -> Result<(), String> {
    if id.is_empty() || id.len() > MAX_CLUSTER_ID {
        return Err(format!(
            "cluster id `{id}` must be 1 to {MAX_CLUSTER_ID} characters long"
        ));
    }
    if let Some(c) = id
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || *c == '_' || *c == '-'))
    {
        return Err(format!(
            "cluster id `{id}` holds {c:?}; allowed are A-Z, a-z, 0-9, `_` and `-`"
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_are_1_to_64_characters_of_a_small_alphabet() {
        for ok in [
            "a",
            "c0492b684152b07c5740548d1430acfe",
            "orders_eu-1",
            &"x".repeat(64),
        ] {
            assert_eq!(check_cluster_id(ok), Ok(()), "{ok}");
        }
        for (bad, why) in [
            ("", "1 to 64"),
            (&"x".repeat(65), "1 to 64"),
            ("a/b", "'/'"),
            ("a b", "' '"),
            ("é", "'é'"),
        ] {
            let e = check_cluster_id(bad).expect_err(bad);
            assert!(e.contains(why), "{bad}: {e}");
        }
    }
}
