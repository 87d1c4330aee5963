//! The receiver's downloads and what each needs next, free of the browser so every decision is
//! tested natively.
//!
//! The page owns one [`Downloads`] (with its own view state per download as `T`), tells it what
//! happens (the storage sink is up, the channel to the sender opens or closes, the sender's list
//! arrives, the sink and the sender answer) and carries out the [`Step`]s it gets back: open a
//! file in the sink, ask the sender for byte ranges, forget a dead transfer's frames.
//!
//! Downloads are keyed by resume key (see [`super::record::resume_key`]), not by the sender's
//! file id: the id changes when the sender's page reloads, so requests name the id of the
//! sender's *current* list, and nothing is asked for on a connection until that list is in.

use super::{ByteRange, FileMeta, TransferId};
use std::collections::{HashMap, HashSet};

/// Downloads whose files are open in the sink at once. A share of a thousand files should not
/// hold two thousand file handles while the sender serves one file after another.
pub const MAX_OPEN: usize = 4;

/// Where the sink stands with a download's file.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OpenState {
    Closed,
    /// `open` sent, its answer not back yet.
    Opening,
    /// Open, and asked for what it misses on the current connection.
    Open,
}

/// What the page does next, in order.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Step {
    /// Open the download's file in the sink; its answer goes to [`Downloads::opened`].
    Open { key: String },
    /// Tell the sink about `transfer`, then ask the sender for `ranges` of its file `meta.id`
    /// under it. `first`: no other request was in flight (the stall clock starts now).
    Request {
        key: String,
        transfer: TransferId,
        file: super::FileId,
        ranges: Vec<ByteRange>,
        first: bool,
    },
    /// The sink drops what still comes for `transfer` (its connection is gone).
    Forget { transfer: TransferId },
}

/// One file this page is fetching (or has paused).
pub struct Download<T> {
    /// The file as the sender's list last described it.
    pub meta: FileMeta,
    /// Still in the sender's list.
    pub offered: bool,
    pub open: OpenState,
    /// What the sink still misses, as it last said.
    pub missing: Vec<ByteRange>,
    /// Bytes stored and verified, as the sink last said.
    pub verified: u64,
    /// Requests sent and not ended.
    outstanding: HashSet<TransferId>,
    /// Order of arrival: downloads open in the order they were started.
    seq: u64,
    /// The page's own state for it (its row, where it is saved…).
    pub view: T,
}

impl<T> Download<T> {
    /// Requests sent for it and not ended.
    pub fn outstanding(&self) -> impl Iterator<Item = TransferId> + '_ {
        self.outstanding.iter().copied()
    }
}

/// What a refusal from the sender means for its download.
pub enum Refusal<T> {
    /// Not a request in flight (cancelled, or of a connection that is gone): nothing to do.
    Stale,
    /// The sender took the file off its list just before: the download waits (what it stored
    /// stays) and resumes if the file returns. The sink may close the file meanwhile.
    Waiting { key: String },
    /// The download is over; `next` opens the one waiting for its place.
    Failed {
        key: String,
        download: Box<Download<T>>,
        next: Vec<Step>,
    },
}

pub struct Downloads<T> {
    by_key: HashMap<String, Download<T>>,
    /// Requests in flight → their download's key.
    transfers: HashMap<TransferId, String>,
    next_transfer: u32,
    next_seq: u64,
    sink_ready: bool,
    connected: bool,
    /// The sender's list has arrived on the current connection.
    listed: bool,
}

impl<T> Default for Downloads<T> {
    fn default() -> Self {
        Self {
            by_key: HashMap::new(),
            transfers: HashMap::new(),
            next_transfer: 1,
            next_seq: 0,
            sink_ready: false,
            connected: false,
            listed: false,
        }
    }
}

impl<T> Downloads<T> {
    pub fn get(&self, key: &str) -> Option<&Download<T>> {
        self.by_key.get(key)
    }

    pub fn get_mut(&mut self, key: &str) -> Option<&mut Download<T>> {
        self.by_key.get_mut(key)
    }

    pub fn contains(&self, key: &str) -> bool {
        self.by_key.contains_key(key)
    }

    pub fn is_empty(&self) -> bool {
        self.by_key.is_empty()
    }

    pub fn iter(&self) -> impl Iterator<Item = (&String, &Download<T>)> {
        self.by_key.iter()
    }

    /// Some request is in flight (frames are due).
    pub fn in_flight(&self) -> bool {
        !self.transfers.is_empty()
    }

    /// `transfer` is a request still running (not one given up on).
    pub fn is_live(&self, transfer: TransferId) -> bool {
        self.transfers.contains_key(&transfer)
    }

    /// Connected, and the sender's current list is known: a request can name its current id.
    pub fn can_ask(&self) -> bool {
        self.connected && self.listed
    }

    /// Starts downloading `meta` (unless it is already under way).
    pub fn add(&mut self, key: String, meta: FileMeta, view: T) -> Vec<Step> {
        if self.by_key.contains_key(&key) {
            return Vec::new();
        }
        let seq = self.next_seq;
        self.next_seq += 1;
        self.by_key.insert(
            key,
            Download {
                meta,
                offered: true,
                open: OpenState::Closed,
                missing: Vec::new(),
                verified: 0,
                outstanding: HashSet::new(),
                seq,
                view,
            },
        );
        self.open_next()
    }

    /// The storage sink is up: downloads can open.
    pub fn sink_ready(&mut self) -> Vec<Step> {
        self.sink_ready = true;
        self.open_next()
    }

    /// A new channel to the sender is open. Nothing is asked for until its list arrives.
    pub fn connected(&mut self) {
        self.connected = true;
        self.listed = false;
    }

    /// The channel is gone: every request in flight is dead, and every download opens (and asks)
    /// again on the next connection.
    pub fn disconnected(&mut self) -> Vec<Step> {
        self.connected = false;
        self.listed = false;
        let mut steps: Vec<Step> = self
            .transfers
            .drain()
            .map(|(transfer, _)| Step::Forget { transfer })
            .collect();
        steps.sort_by_key(|s| match s {
            Step::Forget { transfer } => *transfer,
            _ => TransferId(0),
        });
        for d in self.by_key.values_mut() {
            d.outstanding.clear();
            d.open = OpenState::Closed;
        }
        steps
    }

    /// The sender's list (by resume key). A download follows its file by key, under the file's
    /// current id; one whose file left waits for it; the connection's first list, or a file that
    /// came back, opens them again.
    pub fn listed(&mut self, files: &HashMap<String, FileMeta>) -> Vec<Step> {
        let first = !self.listed;
        self.listed = true;
        let mut returned = false;
        for (key, d) in self.by_key.iter_mut() {
            match files.get(key) {
                Some(meta) => {
                    returned |= !d.offered;
                    d.offered = true;
                    d.meta = meta.clone();
                }
                None => {
                    d.offered = false;
                    if d.open == OpenState::Open {
                        // Nothing more can be asked for it: asked again when it returns.
                        d.open = OpenState::Closed;
                    }
                }
            }
        }
        if first || returned {
            self.open_next()
        } else {
            Vec::new()
        }
    }

    /// The sink opened `key`'s file and says where it stands: ask for what it misses, if the
    /// sender can be asked now; else it opens again when it can.
    pub fn opened(&mut self, key: &str, verified: u64, missing: Vec<ByteRange>) -> Vec<Step> {
        let can_ask = self.can_ask();
        let Some(d) = self.by_key.get_mut(key) else {
            return Vec::new();
        };
        let ask = can_ask && d.offered;
        d.open = if ask {
            OpenState::Open
        } else {
            OpenState::Closed
        };
        d.verified = verified;
        d.missing = missing.clone();
        if ask {
            self.request(key, missing).into_iter().collect()
        } else {
            Vec::new()
        }
    }

    /// A block of `key` did not match its hash: ask for it again.
    pub fn bad_block(&mut self, key: &str, range: ByteRange) -> Vec<Step> {
        self.request(key, vec![range]).into_iter().collect()
    }

    /// The sender ended `transfer` (its `end`): the sink has yet to take its last frames, so its
    /// download still counts it until [`Self::incomplete`] or the file is finished. Returns the
    /// download's key, if the request was live.
    pub fn ended(&mut self, transfer: TransferId) -> Option<String> {
        self.transfers.remove(&transfer)
    }

    /// The sink took `transfer`'s last frame and `key` still misses `missing`: ask for it once no
    /// other request of the download is running.
    pub fn incomplete(
        &mut self,
        key: &str,
        transfer: TransferId,
        missing: Vec<ByteRange>,
    ) -> Vec<Step> {
        let Some(d) = self.by_key.get_mut(key) else {
            return Vec::new();
        };
        d.outstanding.remove(&transfer);
        d.missing = missing.clone();
        if d.outstanding.is_empty() {
            self.request(key, missing).into_iter().collect()
        } else {
            Vec::new()
        }
    }

    /// The sender's file under `key` is not the one partly stored (its root hash differs): it is
    /// fetched whole once no other request of it is running.
    pub fn changed(&mut self, key: &str, transfer: TransferId) -> Vec<Step> {
        let Some(d) = self.by_key.get_mut(key) else {
            return Vec::new();
        };
        d.outstanding.remove(&transfer);
        d.verified = 0;
        let whole = vec![(0, d.meta.size)];
        if d.outstanding.is_empty() {
            self.request(key, whole).into_iter().collect()
        } else {
            Vec::new()
        }
    }

    /// The sender refused `transfer`.
    pub fn refused(&mut self, transfer: TransferId) -> Refusal<T> {
        let Some(key) = self.transfers.remove(&transfer) else {
            return Refusal::Stale;
        };
        match self.by_key.get_mut(&key) {
            None => return Refusal::Stale,
            Some(d) if !d.offered => {
                d.outstanding.remove(&transfer);
                d.open = OpenState::Closed;
                return Refusal::Waiting { key };
            }
            Some(_) => {}
        }
        match self.finish(&key) {
            Some((download, next)) => Refusal::Failed {
                key,
                download: Box::new(download),
                next,
            },
            None => Refusal::Stale,
        }
    }

    /// Takes `key` off the list (done, failed or stopped; its requests are no longer awaited),
    /// and opens the next waiting download.
    pub fn finish(&mut self, key: &str) -> Option<(Download<T>, Vec<Step>)> {
        let d = self.by_key.remove(key)?;
        for t in &d.outstanding {
            self.transfers.remove(t);
        }
        Some((d, self.open_next()))
    }

    /// Asks for `ranges` of `key` under a new transfer id, if the sender can be asked now.
    fn request(&mut self, key: &str, ranges: Vec<ByteRange>) -> Option<Step> {
        if !self.can_ask() || !self.sink_ready {
            return None;
        }
        let d = self.by_key.get_mut(key)?;
        if !d.offered {
            return None;
        }
        let transfer = TransferId(self.next_transfer);
        self.next_transfer = self.next_transfer.wrapping_add(1);
        let first = self.transfers.is_empty();
        d.outstanding.insert(transfer);
        self.transfers.insert(transfer, key.to_owned());
        Some(Step::Request {
            key: key.to_owned(),
            transfer,
            file: d.meta.id,
            ranges,
            first,
        })
    }

    /// Opens the downloads waiting for a place among the [`MAX_OPEN`], oldest first.
    fn open_next(&mut self) -> Vec<Step> {
        if !self.sink_ready {
            return Vec::new();
        }
        let busy = self
            .by_key
            .values()
            .filter(|d| d.open != OpenState::Closed)
            .count();
        let mut waiting: Vec<(u64, &String)> = self
            .by_key
            .iter()
            .filter(|(_, d)| d.offered && d.open == OpenState::Closed)
            .map(|(k, d)| (d.seq, k))
            .collect();
        waiting.sort();
        let keys: Vec<String> = waiting
            .into_iter()
            .take(MAX_OPEN.saturating_sub(busy))
            .map(|(_, k)| k.clone())
            .collect();
        for key in &keys {
            if let Some(d) = self.by_key.get_mut(key) {
                d.open = OpenState::Opening;
            }
        }
        keys.into_iter().map(|key| Step::Open { key }).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::transfer::FileId;

    fn meta(id: u32, name: &str, size: u64) -> FileMeta {
        FileMeta {
            id: FileId(id),
            name: name.into(),
            path: String::new(),
            size,
            mime: String::new(),
            modified: 0,
            hash: None,
        }
    }

    fn list(files: &[(&str, FileMeta)]) -> HashMap<String, FileMeta> {
        files
            .iter()
            .map(|(k, m)| (k.to_string(), m.clone()))
            .collect()
    }

    fn requests(steps: &[Step]) -> Vec<(String, FileId, Vec<ByteRange>)> {
        steps
            .iter()
            .filter_map(|s| match s {
                Step::Request {
                    key, file, ranges, ..
                } => Some((key.clone(), *file, ranges.clone())),
                _ => None,
            })
            .collect()
    }

    fn opens(steps: &[Step]) -> Vec<String> {
        steps
            .iter()
            .filter_map(|s| match s {
                Step::Open { key } => Some(key.clone()),
                _ => None,
            })
            .collect()
    }

    fn transfer_of(steps: &[Step]) -> TransferId {
        steps
            .iter()
            .find_map(|s| match s {
                Step::Request { transfer, .. } => Some(*transfer),
                _ => None,
            })
            .expect("a request")
    }

    /// A table with the sink up, connected, the sender's list in, and `a` open and asked for.
    fn running() -> (Downloads<()>, TransferId) {
        let mut d = Downloads::default();
        d.sink_ready();
        d.connected();
        d.listed(&list(&[("a", meta(1, "a", 100))]));
        assert_eq!(opens(&d.add("a".into(), meta(1, "a", 100), ())), ["a"]);
        let steps = d.opened("a", 0, vec![(0, 100)]);
        assert_eq!(requests(&steps), [("a".into(), FileId(1), vec![(0, 100)])]);
        (d, transfer_of(&steps))
    }

    #[test]
    fn a_download_asks_for_what_the_sink_misses_under_the_current_id() {
        let (d, t) = running();
        assert!(d.is_live(t));
        assert_eq!(d.get("a").map(|x| x.open), Some(OpenState::Open));
    }

    /// The stall seen after a sender's reload: the sink answered before the reloaded page's list
    /// arrived, the receiver asked under the old id, was refused, and dropped the download.
    #[test]
    fn nothing_is_asked_before_the_new_connections_list_arrives() {
        let (mut d, t) = running();
        assert_eq!(d.disconnected(), [Step::Forget { transfer: t }]);
        d.connected();
        // The sink answers "opened" for the reopened file before the list is in.
        let steps = d.opened("a", 40, vec![(40, 100)]);
        assert!(
            requests(&steps).is_empty(),
            "asked before the list: {steps:?}"
        );
        assert_eq!(d.get("a").map(|x| x.open), Some(OpenState::Closed));
        // The reloaded sender's list: the file is not back yet.
        assert!(d.listed(&HashMap::new()).is_empty());
        // It is added again, under a new id: opened again, then asked for under that id.
        assert_eq!(opens(&d.listed(&list(&[("a", meta(7, "a", 100))]))), ["a"]);
        let steps = d.opened("a", 40, vec![(40, 100)]);
        assert_eq!(requests(&steps), [("a".into(), FileId(7), vec![(40, 100)])]);
    }

    #[test]
    fn the_first_list_of_a_connection_reopens_the_downloads() {
        let (mut d, _) = running();
        d.disconnected();
        d.connected();
        assert_eq!(opens(&d.listed(&list(&[("a", meta(1, "a", 100))]))), ["a"]);
        // A later list with nothing new opens nothing more.
        assert!(d.listed(&list(&[("a", meta(1, "a", 100))])).is_empty());
    }

    #[test]
    fn a_refusal_of_a_file_no_longer_listed_leaves_the_download_waiting() {
        let (mut d, t) = running();
        d.listed(&HashMap::new());
        match d.refused(t) {
            Refusal::Waiting { key } => assert_eq!(key, "a"),
            _ => panic!("expected the download to wait"),
        }
        assert!(d.contains("a"));
        assert!(!d.in_flight());
        // Back on the list: opened and asked for again.
        assert_eq!(opens(&d.listed(&list(&[("a", meta(2, "a", 100))]))), ["a"]);
    }

    #[test]
    fn a_refusal_of_a_listed_file_fails_the_download() {
        let (mut d, t) = running();
        match d.refused(t) {
            Refusal::Failed { key, download, .. } => {
                assert_eq!(key, "a");
                assert_eq!(download.meta.id, FileId(1));
            }
            _ => panic!("expected a failure"),
        }
        assert!(!d.contains("a"));
        assert!(matches!(d.refused(t), Refusal::Stale));
    }

    #[test]
    fn at_most_max_open_files_are_open_and_the_next_opens_in_order_as_one_finishes() {
        let mut d: Downloads<()> = Downloads::default();
        let names: Vec<String> = (0..MAX_OPEN + 2).map(|i| format!("f{i}")).collect();
        for (i, n) in names.iter().enumerate() {
            assert!(
                d.add(n.clone(), meta(i as u32, n, 10), ()).is_empty(),
                "no sink yet"
            );
        }
        let opened = opens(&d.sink_ready());
        assert_eq!(opened, names[..MAX_OPEN]);
        let (_, next) = d.finish(&names[0]).expect("a download");
        assert_eq!(opens(&next), [names[MAX_OPEN].clone()]);
    }

    #[test]
    fn a_request_ends_only_when_the_sink_has_its_last_frame() {
        let (mut d, t) = running();
        assert_eq!(d.ended(t).as_deref(), Some("a"));
        assert!(!d.is_live(t), "frames after the end are not acknowledged");
        // The sink took the last frame and a block is still missing: asked again, once.
        let steps = d.incomplete("a", t, vec![(50, 60)]);
        assert_eq!(requests(&steps), [("a".into(), FileId(1), vec![(50, 60)])]);
    }

    #[test]
    fn a_changed_file_is_fetched_whole_and_a_bad_block_again() {
        let (mut d, t) = running();
        let bad = d.bad_block("a", (10, 20));
        assert_eq!(requests(&bad), [("a".into(), FileId(1), vec![(10, 20)])]);
        // Still one request of it running: the whole file waits for it.
        assert!(d.changed("a", t).is_empty());
        let steps = d.changed("a", transfer_of(&bad));
        assert_eq!(requests(&steps), [("a".into(), FileId(1), vec![(0, 100)])]);
        assert_eq!(d.get("a").map(|x| x.verified), Some(0));
    }

    #[test]
    fn nothing_is_asked_while_disconnected_and_the_first_request_starts_the_clock() {
        let (mut d, _) = running();
        d.disconnected();
        assert!(d.bad_block("a", (0, 10)).is_empty());
        d.connected();
        d.listed(&list(&[("a", meta(1, "a", 100))]));
        let steps = d.opened("a", 0, vec![(0, 100)]);
        assert!(matches!(steps[..], [Step::Request { first: true, .. }]));
        let again = d.bad_block("a", (0, 10));
        assert!(matches!(again[..], [Step::Request { first: false, .. }]));
    }
}
