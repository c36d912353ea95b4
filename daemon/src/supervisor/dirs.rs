//! The directories the supervisor watches for changes to its config and model files.
//!
//! Directories, not files: editors and `ollama pull` replace files by rename, which a
//! watch on the file would miss. A directory's inotify watch dies with the directory, so
//! each one is kept with the identity (device, inode, birth time) it had when it was watched: a
//! directory deleted and made again under the same path (`rm -rf models; mkdir models`)
//! is watched again on the next [`DirWatches::set`], which the supervisor calls after
//! every reload, and the reload follows the event of the deletion (which
//! [`DirWatches::note`] also takes as the end of that watch).

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use notify::Watcher;
use tokio::sync::mpsc;

/// A directory's identity: device, inode and birth time (a new directory often gets the
/// inode number its deleted predecessor freed); `None` when it cannot be read.
type DirId = Option<(u64, u64, Option<std::time::SystemTime>)>;

fn dir_id(path: &Path) -> DirId {
    std::fs::metadata(path)
        .ok()
        .map(|m| (m.dev(), m.ino(), m.created().ok()))
}

/// A set of watched directories whose events go to one channel.
pub struct DirWatches {
    watcher: notify::RecommendedWatcher,
    dirs: Vec<(PathBuf, DirId)>,
}

impl DirWatches {
    /// A watcher that sends every event to `tx`; watches nothing yet.
    pub fn new(tx: mpsc::UnboundedSender<notify::Event>) -> notify::Result<DirWatches> {
        let watcher = notify::recommended_watcher(move |res: notify::Result<notify::Event>| {
            if let Ok(ev) = res {
                let _ = tx.send(ev);
            }
        })?;
        Ok(DirWatches {
            watcher,
            dirs: Vec::new(),
        })
    }

    /// Watches exactly `wanted` (non-recursively): stops watching the others, starts on
    /// the new ones and on those that were replaced since they were watched. A directory
    /// that cannot be watched is logged and tried again on the next call.
    pub fn set(&mut self, mut wanted: Vec<PathBuf>) {
        wanted.sort();
        wanted.dedup();
        let wanted: Vec<(PathBuf, DirId)> = wanted
            .into_iter()
            .map(|d| {
                let id = dir_id(&d);
                (d, id)
            })
            .collect();
        for old in &self.dirs {
            if !wanted.contains(old) {
                // A replaced directory's watch is already gone: nothing to undo then.
                let _ = self.watcher.unwatch(&old.0);
            }
        }
        let mut kept = Vec::with_capacity(wanted.len());
        for w in wanted {
            if self.dirs.contains(&w) {
                kept.push(w);
                continue;
            }
            // notify may still hold a watch for this path on a directory that was moved
            // away (the kernel's watch follows the inode): drop it first, or its events
            // would come in under this path and its later removal would take the new
            // directory's watch with it.
            let _ = self.watcher.unwatch(&w.0);
            match self
                .watcher
                .watch(&w.0, notify::RecursiveMode::NonRecursive)
            {
                Ok(()) => kept.push(w),
                Err(e) => tracing::warn!("cannot watch {}: {e}", w.0.display()),
            }
        }
        self.dirs = kept;
    }

    /// Takes note of an event: a watched directory that was deleted or moved away has lost
    /// its watch, so the next [`DirWatches::set`] watches its path again (its identity
    /// alone may not tell: a file system without birth times can give a new directory the
    /// old one's inode).
    pub fn note(&mut self, ev: &notify::Event) {
        use notify::EventKind;
        use notify::event::{ModifyKind, RenameMode};
        let gone = matches!(
            ev.kind,
            EventKind::Remove(_) | EventKind::Modify(ModifyKind::Name(RenameMode::From))
        );
        if gone {
            self.dirs.retain(|(d, _)| !ev.paths.contains(d));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    /// Waits up to `secs` for an event on a path under `dir`.
    async fn event_under(
        rx: &mut mpsc::UnboundedReceiver<notify::Event>,
        dir: &Path,
        secs: f64,
    ) -> bool {
        let deadline = tokio::time::Instant::now() + Duration::from_secs_f64(secs);
        loop {
            match tokio::time::timeout_at(deadline, rx.recv()).await {
                Ok(Some(ev)) if ev.paths.iter().any(|p| p.starts_with(dir)) => return true,
                Ok(Some(_)) => continue,
                Ok(None) | Err(_) => return false,
            }
        }
    }

    /// Takes every event that arrived, as the supervisor does.
    fn drain(rx: &mut mpsc::UnboundedReceiver<notify::Event>, w: &mut DirWatches) {
        while let Ok(ev) = rx.try_recv() {
            w.note(&ev);
        }
    }

    /// What the supervisor does after file events: notes them, then (on the reload they
    /// cause) sets the directories it wants.
    async fn reload(
        rx: &mut mpsc::UnboundedReceiver<notify::Event>,
        w: &mut DirWatches,
        wanted: &Path,
    ) {
        tokio::time::sleep(Duration::from_millis(100)).await;
        drain(rx, w);
        w.set(vec![wanted.to_path_buf()]);
    }

    #[tokio::test]
    async fn a_directory_made_again_is_watched_again() {
        let top = tempfile::tempdir().unwrap();
        let models = top.path().join("models");
        std::fs::create_dir(&models).unwrap();
        let (tx, mut rx) = mpsc::unbounded_channel();
        let mut w = DirWatches::new(tx).unwrap();
        w.set(vec![models.clone()]);
        std::fs::write(models.join("m.gguf"), b"one").unwrap();
        assert!(
            event_under(&mut rx, &models, 5.0).await,
            "no event in the watched dir"
        );

        // Replaced under the same path: the old watch died with the old directory.
        std::fs::remove_dir_all(&models).unwrap();
        std::fs::create_dir(&models).unwrap();
        reload(&mut rx, &mut w, &models).await;
        std::fs::write(models.join("m.gguf"), b"two").unwrap();
        assert!(
            event_under(&mut rx, &models, 5.0).await,
            "a directory made again is not watched"
        );
        assert_eq!(w.dirs.len(), 1);

        // Moved away and made again: the old directory's watch goes, the new one's
        // comes, and removing the old directory later leaves the new one watched.
        let old = top.path().join("models.old");
        std::fs::rename(&models, &old).unwrap();
        std::fs::create_dir(&models).unwrap();
        reload(&mut rx, &mut w, &models).await;
        std::fs::write(old.join("x"), b"old").unwrap();
        assert!(
            !event_under(&mut rx, &models, 0.5).await,
            "the moved-away directory still reports under the old path"
        );
        std::fs::remove_dir_all(&old).unwrap();
        reload(&mut rx, &mut w, &models).await;
        std::fs::write(models.join("m.gguf"), b"four").unwrap();
        assert!(
            event_under(&mut rx, &models, 5.0).await,
            "the new directory lost its watch when the old one was removed"
        );

        // Not wanted any more: no events from it.
        reload(&mut rx, &mut w, top.path()).await;
        std::fs::write(models.join("m.gguf"), b"three").unwrap();
        assert!(
            !event_under(&mut rx, &models, 0.5).await,
            "an unwatched dir sends events"
        );
    }
}
