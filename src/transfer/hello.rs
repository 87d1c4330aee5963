//! The sender's answer to a receiver's sealed hello, free of the browser so it is tested
//! natively: connect (replacing what the new hello supersedes), ignore it, or make it wait.

use crate::protocol::PeerId;

/// A receiver the sender holds a connection (or a connection attempt) for.
#[derive(Clone, Copy, Debug)]
pub struct Known {
    /// The id it is kept under: the one it first said hello from.
    pub key: PeerId,
    /// The id its signaling socket has now (it differs after a `moved`).
    pub via: PeerId,
    /// The hello its connection answers.
    pub attempt: u32,
    /// Its channel is open (it is no longer pending).
    pub open: bool,
}

/// What to do with hello number `attempt` from `peer`.
#[derive(Debug, PartialEq, Eq)]
pub enum Answer {
    /// A hello this connection already answers (or an older one, arriving late).
    Stale,
    /// Too many receivers are still connecting: this one asks again later.
    Busy { pending: usize },
    /// Drop the connections in `replace` (its own older one; one it had moved onto), then
    /// connect and offer.
    Connect { replace: Vec<PeerId> },
}

/// Decides on a hello. A receiver's newer hello means its connection broke: the old one goes.
/// Receivers whose channel is not open yet are pending; at most `max_pending` at once, so a
/// flood of hellos costs the sender a bounded number of peer connections.
pub fn answer(known: &[Known], peer: PeerId, attempt: u32, max_pending: usize) -> Answer {
    if known.iter().any(|k| k.key == peer && k.attempt >= attempt) {
        return Answer::Stale;
    }
    // Its own older connection, and one it reached us through after moving to this id.
    let replace: Vec<PeerId> = known
        .iter()
        .filter(|k| k.key == peer || k.via == peer)
        .map(|k| k.key)
        .collect();
    let pending = known
        .iter()
        .filter(|k| !k.open && !replace.contains(&k.key))
        .count();
    if pending >= max_pending {
        return Answer::Busy { pending };
    }
    Answer::Connect { replace }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn peer(n: u8) -> PeerId {
        PeerId(uuid::Uuid::from_bytes([n; 16]))
    }

    fn known(key: u8, attempt: u32, open: bool) -> Known {
        Known {
            key: peer(key),
            via: peer(key),
            attempt,
            open,
        }
    }

    #[test]
    fn a_first_hello_connects() {
        assert_eq!(
            answer(&[known(1, 1, true)], peer(2), 1, 4),
            Answer::Connect { replace: vec![] }
        );
    }

    #[test]
    fn the_same_or_an_older_hello_is_stale_and_a_newer_one_replaces() {
        let k = [known(1, 2, true)];
        assert_eq!(answer(&k, peer(1), 2, 4), Answer::Stale);
        assert_eq!(answer(&k, peer(1), 1, 4), Answer::Stale);
        assert_eq!(
            answer(&k, peer(1), 3, 4),
            Answer::Connect {
                replace: vec![peer(1)]
            }
        );
    }

    #[test]
    fn a_moved_receiver_saying_hello_again_replaces_the_connection_it_moved_onto() {
        let moved = Known {
            via: peer(9),
            ..known(1, 1, true)
        };
        assert_eq!(
            answer(&[moved], peer(9), 1, 4),
            Answer::Connect {
                replace: vec![peer(1)]
            }
        );
    }

    #[test]
    fn pending_receivers_are_capped_and_the_one_replaced_does_not_count() {
        let k: Vec<Known> = (1..=3).map(|n| known(n, 1, false)).collect();
        assert_eq!(answer(&k, peer(7), 1, 3), Answer::Busy { pending: 3 });
        assert_eq!(
            answer(&k, peer(7), 1, 4),
            Answer::Connect { replace: vec![] }
        );
        // A pending receiver's newer hello replaces itself: room for it.
        assert_eq!(
            answer(&k, peer(2), 2, 3),
            Answer::Connect {
                replace: vec![peer(2)]
            }
        );
        // Open receivers are not pending.
        let open: Vec<Known> = (1..=3).map(|n| known(n, 1, true)).collect();
        assert_eq!(
            answer(&open, peer(7), 1, 3),
            Answer::Connect { replace: vec![] }
        );
    }
}
