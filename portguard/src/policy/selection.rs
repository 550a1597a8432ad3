//! Which policy applies when several select the same cgroup (or, for
//! `portguard check`, the same declared container): the most specific
//! selector ([`Selector::specificity`]) wins, and among equally specific
//! ones the first in the policy file does. The agent's resolver and the
//! manifest analysis both decide by this one rule.
//!
//! Owns [`most_specific`]. May import the policy model (`super`) only.

use std::cmp::Reverse;

use super::Selector;

/// Of the policies selecting one cgroup, given as (index in the policy
/// file, selector), the index of the one that applies: the highest
/// [`Selector::specificity`]; among equally specific ones the lowest index
/// (first in the file). `None` when there are no candidates. The order of
/// the candidates does not matter, so it also settles a pair: the policy
/// holding a cgroup keeps it against a newcomer unless
/// `most_specific([holder, newcomer])` names the newcomer.
pub fn most_specific<'a>(
    candidates: impl IntoIterator<Item = (usize, &'a Selector)>,
) -> Option<usize> {
    candidates
        .into_iter()
        .max_by_key(|&(i, s)| (s.specificity(), Reverse(i)))
        .map(|(i, _)| i)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::PodSelector;

    fn pods(namespace: Option<&str>, labels: &[(&str, &str)], container: Option<&str>) -> Selector {
        Selector::Pods(PodSelector {
            namespace: namespace.map(str::to_owned),
            labels: labels
                .iter()
                .map(|&(k, v)| (k.to_owned(), v.to_owned()))
                .collect(),
            container: container.map(str::to_owned),
        })
    }

    #[test]
    fn the_most_specific_selector_wins_and_the_first_breaks_ties() {
        let every = pods(None, &[], None);
        let label = pods(None, &[("app", "web")], None);
        let other_label = pods(None, &[("tier", "front")], None);
        let namespace = pods(Some("shop"), &[], None);
        let container = pods(None, &[], Some("envoy"));
        let unit = Selector::Unit("nginx.service".into());
        let cgroup = Selector::Cgroup("/a".into());
        assert_eq!(most_specific([]), None);
        assert_eq!(most_specific([(3, &every)]), Some(3));
        // More specific wins wherever it is in the file.
        assert_eq!(most_specific([(0, &every), (1, &label)]), Some(1));
        assert_eq!(most_specific([(0, &label), (1, &namespace)]), Some(1));
        assert_eq!(most_specific([(0, &namespace), (1, &container)]), Some(1));
        assert_eq!(most_specific([(0, &container), (1, &unit)]), Some(1));
        assert_eq!(most_specific([(0, &unit), (1, &cgroup)]), Some(1));
        // Equally specific: the first in the file, whatever the order given.
        assert_eq!(most_specific([(4, &label), (2, &other_label)]), Some(2));
        assert_eq!(most_specific([(2, &other_label), (4, &label)]), Some(2));
        // A pair decides like the whole list.
        let all = [(0, &every), (1, &label), (2, &other_label), (3, &namespace)];
        assert_eq!(most_specific(all), Some(3));
        assert_eq!(most_specific([all[1], all[2]]), Some(1));
    }
}
