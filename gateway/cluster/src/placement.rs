//! Where a one-shot call runs: here when this node has a VM ready for it,
//! else on the better of K members sampled from the published loads (best
//! of K, as E2B places sandboxes: sampling keeps every node from piling on
//! the one that looks best in stale figures), and here again when no one is
//! better. A pure function over a [`View`]; the caller forwards.

use crate::view::View;

/// Members sampled per placement.
pub const K: usize = 2;

/// Where to run.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Placement {
    Local,
    /// Forward to these, in order (the second is tried once if the first
    /// refuses with a 429 or cannot be reached).
    Forward(Vec<Target>),
}

/// A member to forward to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target {
    pub node: String,
    pub addr: String,
}

/// What this node knows of its own state for the call.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Here {
    /// VMs of the image ready now.
    pub ready: usize,
    /// VMs it could still make for the image.
    pub free: usize,
}

/// Choose for a call of `image` on node `me`. `inflight(node)` is how many
/// calls this node forwarded there and has not had answered (counted
/// against the member's published room); `pick(n)` is a random index below
/// `n` (injected, so tests are exact).
pub fn place(
    view: &View,
    me: &str,
    image: &str,
    here: Here,
    inflight: impl Fn(&str) -> usize,
    mut pick: impl FnMut(usize) -> usize,
) -> Placement {
    if here.ready > 0 {
        return Placement::Local;
    }
    // Members that serve the image and have room, this one aside: (VMs
    // ready for this call, room), less what this node already sent there.
    let mut candidates: Vec<((usize, usize), Target)> = view
        .members
        .iter()
        .filter(|(name, m)| name.as_str() != me && !m.draining)
        .filter_map(|(name, m)| {
            let load = view.loads.get(name)?.images.get(image)?;
            let sent = inflight(name);
            let ready = load.ready.saturating_sub(sent);
            let room = (load.ready + load.free).saturating_sub(sent);
            (room > 0).then(|| ((ready, room), Target { node: name.clone(), addr: m.addr.clone() }))
        })
        .collect();
    if candidates.is_empty() {
        return Placement::Local;
    }
    // Best of K sampled (all of them when there are no more than K): a
    // ready VM first, then the most room.
    let mut sampled = Vec::with_capacity(K);
    while sampled.len() < K && !candidates.is_empty() {
        let i = pick(candidates.len()) % candidates.len();
        sampled.push(candidates.swap_remove(i));
    }
    sampled.sort_by(|a, b| {
        let key = |c: &((usize, usize), Target)| (c.0 .0 > 0, c.0 .1);
        key(b).cmp(&key(a)).then_with(|| a.1.node.cmp(&b.1.node))
    });
    // Here is as good when it can make a VM and the best has none ready.
    if here.free > 0 && sampled[0].0 .0 == 0 {
        return Placement::Local;
    }
    Placement::Forward(sampled.into_iter().map(|(_, t)| t).collect())
}

/// Choose for a call of function warm set `set` (of `image`): here when a
/// VM warm for it is ready here; else the members with VMs warm for it,
/// most first; else as [`place`] does, but with the members ranked by a
/// rendezvous hash of the set instead of sampled, so that a function's
/// calls gather on one home node and its VMs stay warm there.
pub fn place_function(
    view: &View,
    me: &str,
    image: &str,
    set: &str,
    here: Here,
    warm_here: usize,
    inflight: impl Fn(&str) -> usize,
) -> Placement {
    if warm_here > 0 {
        return Placement::Local;
    }
    let live = |name: &String, m: &crate::view::Member| name.as_str() != me && !m.draining;
    let mut warm: Vec<(usize, Target)> = view
        .members
        .iter()
        .filter(|(name, m)| live(name, m))
        .filter_map(|(name, m)| {
            let w = view
                .loads
                .get(name)?
                .images
                .get(image)?
                .warm
                .get(set)
                .copied()?
                .saturating_sub(inflight(name));
            (w > 0).then(|| (w, Target { node: name.clone(), addr: m.addr.clone() }))
        })
        .collect();
    if !warm.is_empty() {
        warm.sort_by(|a, b| b.0.cmp(&a.0).then_with(|| a.1.node.cmp(&b.1.node)));
        return Placement::Forward(warm.into_iter().take(K).map(|(_, t)| t).collect());
    }
    if here.ready > 0 {
        return Placement::Local;
    }
    // The set's home: the highest hash of (set, node) among this node and
    // the members with room.
    let mut ranked: Vec<(u64, Option<Target>)> = view
        .members
        .iter()
        .filter(|(name, m)| live(name, m))
        .filter_map(|(name, m)| {
            let load = view.loads.get(name)?.images.get(image)?;
            let room = (load.ready + load.free).saturating_sub(inflight(name));
            (room > 0)
                .then(|| (rendezvous(set, name), Some(Target { node: name.clone(), addr: m.addr.clone() })))
        })
        .collect();
    if here.free > 0 {
        ranked.push((rendezvous(set, me), None));
    }
    ranked.sort_by_key(|r| std::cmp::Reverse(r.0));
    match ranked.first() {
        None | Some((_, None)) => Placement::Local,
        Some(_) => Placement::Forward(ranked.into_iter().map_while(|(_, t)| t).take(K).collect()),
    }
}

/// A stable hash of a function set and a node (every node computes the
/// same ranking).
fn rendezvous(set: &str, node: &str) -> u64 {
    use std::hash::{Hash as _, Hasher as _};
    let mut h = std::collections::hash_map::DefaultHasher::new();
    (set, node).hash(&mut h);
    h.finish()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::view::{ImageLoad, Load, Member};

    fn view(nodes: &[(&str, usize, usize, bool)]) -> View {
        let mut v = View::default();
        for &(name, ready, free, draining) in nodes {
            v.members.insert(
                name.into(),
                Member {
                    node: name.into(),
                    addr: format!("{name}:8080"),
                    incarnation: 1,
                    version: "0".into(),
                    started: String::new(),
                    draining,
                },
            );
            let mut load = Load::default();
            load.images
                .insert("default".into(), ImageLoad { ready, free, sessions: 0, warm: Default::default() });
            v.loads.insert(name.into(), load);
        }
        v
    }

    fn nodes(p: &Placement) -> Vec<&str> {
        match p {
            Placement::Local => vec!["local"],
            Placement::Forward(t) => t.iter().map(|t| t.node.as_str()).collect(),
        }
    }

    #[test]
    fn a_ready_vm_here_wins() {
        let v = view(&[("a", 1, 0, false), ("b", 5, 5, false)]);
        assert_eq!(place(&v, "a", "default", Here { ready: 1, free: 0 }, |_| 0, |_| 0), Placement::Local);
    }

    #[test]
    fn a_full_node_forwards_to_the_better_of_two() {
        let v = view(&[("a", 0, 0, false), ("b", 0, 1, false), ("c", 2, 0, false)]);
        let p = place(&v, "a", "default", Here { ready: 0, free: 0 }, |_| 0, |_| 0);
        assert_eq!(nodes(&p), ["c", "b"]);
    }

    #[test]
    fn draining_full_and_other_image_members_are_not_candidates() {
        let mut v = view(&[("a", 0, 0, false), ("b", 3, 0, true), ("c", 0, 0, false)]);
        v.loads.get_mut("c").unwrap().images.clear();
        let p = place(&v, "a", "default", Here { ready: 0, free: 0 }, |_| 0, |_| 0);
        assert_eq!(p, Placement::Local, "no one has room: here (it queues or says 429)");
    }

    #[test]
    fn forwards_not_yet_answered_use_up_a_members_room() {
        let v = view(&[("a", 0, 0, false), ("b", 1, 0, false), ("c", 0, 1, false)]);
        let p = place(&v, "a", "default", Here { ready: 0, free: 0 }, |n| usize::from(n == "b"), |_| 0);
        assert_eq!(nodes(&p), ["c"]);
    }

    #[test]
    fn here_with_room_stays_unless_another_has_a_vm_ready() {
        let v = view(&[("a", 0, 1, false), ("b", 0, 2, false)]);
        assert_eq!(place(&v, "a", "default", Here { ready: 0, free: 1 }, |_| 0, |_| 0), Placement::Local);
        let v = view(&[("a", 0, 1, false), ("b", 1, 0, false)]);
        let p = place(&v, "a", "default", Here { ready: 0, free: 1 }, |_| 0, |_| 0);
        assert_eq!(nodes(&p), ["b"]);
    }

    #[test]
    fn a_function_goes_where_its_warm_vms_are() {
        let mut v = view(&[("a", 1, 1, false), ("b", 1, 1, false), ("c", 1, 1, false)]);
        v.loads.get_mut("c").unwrap().images.get_mut("default").unwrap().warm.insert("f".into(), 2);
        let here = Here { ready: 1, free: 1 };
        assert_eq!(place_function(&v, "a", "default", "f", here, 1, |_| 0), Placement::Local, "warm here");
        assert_eq!(nodes(&place_function(&v, "a", "default", "f", here, 0, |_| 0)), ["c"]);
        // Its warm VMs all taken by this node's own forwards: placed as any call.
        assert_eq!(
            place_function(&v, "a", "default", "f", here, 0, |n| if n == "c" { 2 } else { 0 }),
            Placement::Local
        );
    }

    #[test]
    fn without_warm_vms_a_function_has_one_home_every_node_agrees_on() {
        let v = view(&[("a", 0, 1, false), ("b", 0, 1, false), ("c", 0, 1, false)]);
        let here = Here { ready: 0, free: 1 };
        let homes: Vec<String> = ["a", "b", "c"]
            .iter()
            .map(|me| match place_function(&v, me, "default", "wordfreq", here, 0, |_| 0) {
                Placement::Local => me.to_string(),
                Placement::Forward(t) => t[0].node.clone(),
            })
            .collect();
        assert!(homes.iter().all(|h| *h == homes[0]), "nodes disagree on the home: {homes:?}");
        // Other functions spread over other homes.
        let spread: std::collections::BTreeSet<String> = (0..20)
            .map(|i| match place_function(&v, "a", "default", &format!("fn{i}"), here, 0, |_| 0) {
                Placement::Local => "a".to_string(),
                Placement::Forward(t) => t[0].node.clone(),
            })
            .collect();
        assert!(spread.len() >= 2, "every function had the same home: {spread:?}");
    }

    #[test]
    fn sampling_spreads_over_equal_members() {
        let v = view(&[("a", 0, 0, false), ("b", 1, 0, false), ("c", 1, 0, false), ("d", 1, 0, false)]);
        let mut seen = std::collections::BTreeSet::new();
        for seed in 0..12 {
            let mut s = seed;
            let p = place(
                &v,
                "a",
                "default",
                Here { ready: 0, free: 0 },
                |_| 0,
                |n| {
                    s = s * 7 + 3;
                    s % n
                },
            );
            seen.insert(nodes(&p)[0].to_string());
        }
        assert!(seen.len() >= 2, "always the same member: {seen:?}");
    }
}
