//! The sim's durable state: a snapshot (`sim.json`) plus an append-only journal
//! (`sim.journal`) of the records each change touched. Appending one short line per change
//! keeps a host with tens of thousands of VMs fast (rewriting the whole state on every
//! change made each create O(VMs)); at start the journal is replayed and compacted into a
//! fresh snapshot. A `kill -9` can at worst cut the last line, which replay ignores.

use std::collections::BTreeMap;
use std::fs::{File, OpenOptions};
use std::io::{self, BufRead, BufReader, Write};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::{SnapshotInfo, VmInfo};
use crate::state;

/// Everything the sim keeps on disk.
#[derive(Debug, Default, Serialize, Deserialize)]
pub(super) struct Records {
    pub vms: BTreeMap<String, VmInfo>,
    pub snapshots: BTreeMap<String, SnapshotInfo>,
}

/// A record a change touched, to be journaled as it now is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum Touched {
    Vm(String),
    Snapshot(String),
}

/// One journal line: a record's new value, or `None` when it was removed.
#[derive(Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
enum Entry {
    Vm {
        id: String,
        vm: Option<VmInfo>,
    },
    Snapshot {
        id: String,
        snapshot: Option<SnapshotInfo>,
    },
}

pub(super) struct Journal {
    file: File,
}

impl Journal {
    /// Loads the snapshot, replays the journal over it, writes the result as the new
    /// snapshot and starts an empty journal.
    pub fn open(state_dir: &Path) -> io::Result<(Records, Journal)> {
        let snapshot_path = state_dir.join("sim.json");
        let journal_path = state_dir.join("sim.journal");
        let mut records = state::read_json::<Records>(&snapshot_path)?.unwrap_or_default();
        replay(&journal_path, &mut records)?;
        state::write_json(&snapshot_path, &records)?;
        let file = OpenOptions::new()
            .create(true)
            .write(true)
            .truncate(true)
            .open(&journal_path)?;
        Ok((records, Journal { file }))
    }

    /// Appends the current value of each touched record (one `write` for all of them).
    pub fn append(&mut self, records: &Records, touched: &[Touched]) -> io::Result<()> {
        let mut buf = Vec::new();
        for t in touched {
            let entry = match t {
                Touched::Vm(id) => Entry::Vm {
                    id: id.clone(),
                    vm: records.vms.get(id).cloned(),
                },
                Touched::Snapshot(id) => Entry::Snapshot {
                    id: id.clone(),
                    snapshot: records.snapshots.get(id).cloned(),
                },
            };
            serde_json::to_writer(&mut buf, &entry).map_err(io::Error::other)?;
            buf.push(b'\n');
        }
        self.file.write_all(&buf)
    }
}

fn replay(path: &PathBuf, records: &mut Records) -> io::Result<()> {
    let file = match File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(e),
    };
    let lines: Vec<String> = BufReader::new(file).lines().collect::<Result<_, _>>()?;
    let last = lines.len().saturating_sub(1);
    for (n, line) in lines.iter().enumerate() {
        match serde_json::from_str::<Entry>(line) {
            Ok(Entry::Vm { id, vm: Some(vm) }) => {
                records.vms.insert(id, vm);
            }
            Ok(Entry::Vm { id, vm: None }) => {
                records.vms.remove(&id);
            }
            Ok(Entry::Snapshot {
                id,
                snapshot: Some(s),
            }) => {
                records.snapshots.insert(id, s);
            }
            Ok(Entry::Snapshot { id, snapshot: None }) => {
                records.snapshots.remove(&id);
            }
            // Only the last line may be cut short by a kill; anything else is corruption.
            Err(_) if n == last => {}
            Err(e) => {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!("{} line {}: {e}", path.display(), n + 1),
                ));
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::driver::VmState;

    fn vm(id: &str) -> VmInfo {
        VmInfo {
            sandbox_id: id.into(),
            state: VmState::Running,
            vcpus: 1,
            memory_mb: 128,
            created_at_ms: 1,
        }
    }

    #[test]
    fn replays_changes_and_ignores_a_cut_last_line() {
        let dir = tempfile::tempdir().unwrap();
        let (mut records, mut journal) = Journal::open(dir.path()).unwrap();
        for id in ["a", "b"] {
            records.vms.insert(id.into(), vm(id));
            journal.append(&records, &[Touched::Vm(id.into())]).unwrap();
        }
        records.vms.remove("a");
        journal
            .append(&records, &[Touched::Vm("a".into())])
            .unwrap();
        drop(journal);
        // A kill in the middle of a write leaves half a line at the end.
        let mut f = OpenOptions::new()
            .append(true)
            .open(dir.path().join("sim.journal"))
            .unwrap();
        f.write_all(br#"{"vm":{"id":"c","vm":{"sandb"#).unwrap();

        let (reloaded, _journal) = Journal::open(dir.path()).unwrap();
        assert_eq!(reloaded.vms.keys().collect::<Vec<_>>(), ["b"]);
        // Compacted: the journal starts empty and the snapshot holds the state.
        assert_eq!(
            std::fs::read(dir.path().join("sim.journal")).unwrap().len(),
            0
        );
        let (again, _) = Journal::open(dir.path()).unwrap();
        assert_eq!(again.vms.keys().collect::<Vec<_>>(), ["b"]);
    }

    #[test]
    fn a_corrupt_line_before_the_end_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(
            dir.path().join("sim.journal"),
            "garbage\n{\"vm\":{\"id\":\"a\",\"vm\":null}}\n",
        )
        .unwrap();
        assert!(Journal::open(dir.path()).is_err());
    }
}
