//! Root rotation rules for reloads: a new root set is accepted when it adds
//! roots to the old set or removes some (istiod's `ISTIO_MULTIROOT_MESH`
//! semantics, always on here); anything else replaces trust and needs an
//! explicit opt-in.

/// How a new root set relates to the old one (compared as DER sets).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RootChange {
    Same,
    /// Old roots are all kept, new ones added (step 1 of a root rotation).
    Added,
    /// New set is a strict subset of the old (last step of a root rotation).
    Removed,
    /// Some roots kept, some dropped, some added.
    PartialOverlap,
    /// No root in common: every existing workload certificate loses trust.
    Disjoint,
}

impl RootChange {
    pub fn classify(old: &[Vec<u8>], new: &[Vec<u8>]) -> RootChange {
        let old_in_new = old.iter().all(|o| new.contains(o));
        let new_in_old = new.iter().all(|n| old.contains(n));
        match (old_in_new, new_in_old) {
            (true, true) => RootChange::Same,
            (true, false) => RootChange::Added,
            (false, true) => RootChange::Removed,
            (false, false) if old.iter().any(|o| new.contains(o)) => RootChange::PartialOverlap,
            (false, false) => RootChange::Disjoint,
        }
    }

    /// Whether the change keeps every workload able to verify during the swap.
    pub fn is_safe(self) -> bool {
        matches!(
            self,
            RootChange::Same | RootChange::Added | RootChange::Removed
        )
    }
}

impl std::fmt::Display for RootChange {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            RootChange::Same => "unchanged",
            RootChange::Added => "roots added (old roots kept)",
            RootChange::Removed => "roots removed (the rest kept)",
            RootChange::PartialOverlap => "roots both added and removed",
            RootChange::Disjoint => "roots replaced (no root in common)",
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn set(items: &[u8]) -> Vec<Vec<u8>> {
        items.iter().map(|i| vec![*i]).collect()
    }

    #[test]
    fn subset_and_superset_changes_are_safe_in_any_order() {
        assert_eq!(
            RootChange::classify(&set(&[1]), &set(&[1])),
            RootChange::Same
        );
        assert_eq!(
            RootChange::classify(&set(&[1, 2]), &set(&[2, 1])),
            RootChange::Same
        );
        assert_eq!(
            RootChange::classify(&set(&[1]), &set(&[2, 1])),
            RootChange::Added
        );
        assert_eq!(
            RootChange::classify(&set(&[1, 2]), &set(&[2])),
            RootChange::Removed
        );
        assert!(RootChange::Added.is_safe() && RootChange::Removed.is_safe());
    }

    #[test]
    fn disjoint_and_partial_changes_are_not_safe() {
        assert_eq!(
            RootChange::classify(&set(&[1]), &set(&[2])),
            RootChange::Disjoint
        );
        assert_eq!(
            RootChange::classify(&set(&[1, 2]), &set(&[2, 3])),
            RootChange::PartialOverlap
        );
        assert!(!RootChange::Disjoint.is_safe() && !RootChange::PartialOverlap.is_safe());
    }
}
