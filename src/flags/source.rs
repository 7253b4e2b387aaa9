//! The flag source thread: the one owner of flag I/O and evaluation.
//!
//! It holds the [`FlagStore`], feeds it from the configured source (LaunchDarkly, else the
//! local flag file, else nothing), re-evaluates the watched flags for this daemon's context
//! after every change, and stores the results into [`FlagValues`]. Other threads reach it only
//! through [`FlagSource`] (reload, stop) and only read what it stores.

use super::evaluate::{Evaluated, evaluate_number};
use super::file::{self, FlagFileError};
use super::store::{AllData, DataEvent, FlagStore};
use super::{FlagValues, Origin, SourceState, Watched};
use crate::config::{FlagsConfig, LaunchDarklyConfig};
use crate::launchdarkly::{self, LdMessage};
use crossbeam_channel::{Receiver, Sender, bounded, never, select, unbounded};
use launchdarkly_server_sdk_evaluation::{Context, ContextBuilder};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, SystemTime};

/// Everything the source thread needs to know; rebuilt from the config on reload.
#[derive(Clone, Debug)]
pub struct SourceSettings {
    pub flags: FlagsConfig,
    pub launchdarkly: LaunchDarklyConfig,
    /// `worker` or `queuer`: a context attribute rules can target.
    pub role: &'static str,
    /// The job queue's name: a context attribute rules can target.
    pub queue: String,
}

enum Control {
    Reload(Box<SourceSettings>),
    Stop,
}

/// The handle other threads hold: tell the source to reload or stop.
pub struct FlagSource {
    control: Sender<Control>,
    thread: Option<JoinHandle<()>>,
}

impl FlagSource {
    /// Starts the source thread and waits until it has its first data, at most the configured
    /// startup wait (LaunchDarkly) or until the flag file has been read; after that the daemon
    /// runs on whatever it has, and the source keeps trying in the background.
    pub fn spawn(settings: SourceSettings, values: Arc<FlagValues>) -> std::io::Result<FlagSource> {
        let (control_tx, control_rx) = unbounded();
        let (ready_tx, ready_rx) = bounded(1);
        let wait = if settings.launchdarkly.sdk_key.is_some() {
            settings.launchdarkly.startup_wait
        } else {
            Duration::from_secs(5)
        };
        let thread = std::thread::Builder::new()
            .name("flag-source".into())
            .spawn(move || {
                let mut worker = SourceThread::new(settings, values, ready_tx);
                worker.run(control_rx);
            })?;
        if ready_rx.recv_timeout(wait).is_err() {
            log::warn!(
                "flag source not ready after {} ms; running on cached or fallback values",
                wait.as_millis()
            );
        }
        Ok(FlagSource {
            control: control_tx,
            thread: Some(thread),
        })
    }

    /// Hands new settings to the source thread (SIGHUP).
    pub fn reload(&self, settings: SourceSettings) {
        let _ = self.control.send(Control::Reload(Box::new(settings)));
    }
}

impl Drop for FlagSource {
    fn drop(&mut self) {
        let _ = self.control.send(Control::Stop);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// The file's identity for change detection: a rewrite changes the modification time or the
/// length (or both).
#[derive(Clone, Copy, PartialEq, Eq)]
struct FileStamp {
    modified: Option<SystemTime>,
    len: u64,
}

fn stamp(path: &Path) -> Option<FileStamp> {
    let meta = std::fs::metadata(path).ok()?;
    Some(FileStamp {
        modified: meta.modified().ok(),
        len: meta.len(),
    })
}

struct SourceThread {
    settings: SourceSettings,
    values: Arc<FlagValues>,
    store: FlagStore,
    context: Option<Context>,
    ready: Option<Sender<()>>,
    /// The flag file's stamp at the last look (`Some(None)`: it did not exist); `None` before
    /// the first look or after a reload, to force a read.
    file_stamp: Option<Option<FileStamp>>,
    launchdarkly: Option<launchdarkly::LdHandle>,
    /// The last problem warned about for each watched flag, so a bad value is warned about once
    /// rather than on every re-evaluation, and a different problem is warned about again.
    warned: [Option<String>; 2],
}

impl SourceThread {
    fn new(settings: SourceSettings, values: Arc<FlagValues>, ready: Sender<()>) -> SourceThread {
        let context = build_context(&settings);
        SourceThread {
            settings,
            values,
            store: FlagStore::default(),
            context,
            ready: Some(ready),
            file_stamp: None,
            launchdarkly: None,
            warned: [None, None],
        }
    }

    fn run(&mut self, control: Receiver<Control>) {
        let ld_rx = self.start();
        let mut ld_rx = ld_rx.unwrap_or_else(never);
        loop {
            let file_tick = if self.file_path().is_some() {
                crossbeam_channel::after(self.settings.flags.file_check)
            } else {
                never()
            };
            select! {
                recv(control) -> msg => match msg {
                    Ok(Control::Reload(settings)) => self.reload(*settings),
                    Ok(Control::Stop) | Err(_) => break,
                },
                recv(ld_rx) -> msg => match msg {
                    Ok(LdMessage::Data(event)) => self.apply_remote(event),
                    Ok(LdMessage::State { state, reason }) => self.remote_state(state, &reason),
                    // The LaunchDarkly thread ended: a closed channel is always ready, so stop
                    // selecting on it rather than spin.
                    Err(_) => ld_rx = never(),
                },
                recv(file_tick) -> _ => self.check_file(),
            }
        }
        if let Some(ld) = self.launchdarkly.take() {
            ld.stop();
        }
    }

    /// Loads what exists locally (state file, flag file) and starts LaunchDarkly if configured.
    fn start(&mut self) -> Option<Receiver<LdMessage>> {
        if self.settings.launchdarkly.sdk_key.is_some() {
            if let Some(path) = self.settings.launchdarkly.state_file.clone() {
                self.load_state_file(&path);
            }
            self.values.set_state(SourceState::Initializing);
            if self.settings.flags.file.is_some() {
                log::warn!(
                    "both launchdarkly.sdk_key and flags.file are set; LaunchDarkly is the source, the flag file is ignored"
                );
            }
            let (tx, rx) = unbounded();
            match launchdarkly::spawn(
                launchdarkly::LdSettings::from_config(&self.settings.launchdarkly),
                tx,
            ) {
                Ok(handle) => {
                    self.launchdarkly = Some(handle);
                    Some(rx)
                }
                Err(e) => {
                    log::error!("cannot start the LaunchDarkly thread: {e}");
                    self.values.set_state(SourceState::Off);
                    self.signal_ready();
                    None
                }
            }
        } else {
            self.check_file();
            self.signal_ready();
            None
        }
    }

    fn file_path(&self) -> Option<PathBuf> {
        if self.settings.launchdarkly.sdk_key.is_some() {
            None
        } else {
            self.settings.flags.file.clone()
        }
    }

    fn signal_ready(&mut self) {
        if let Some(ready) = self.ready.take() {
            let _ = ready.send(());
        }
    }

    /// Re-reads the flag file when it changed since the last look.
    fn check_file(&mut self) {
        let Some(path) = self.file_path() else {
            return;
        };
        let now = stamp(&path);
        if self.file_stamp == Some(now) {
            return;
        }
        self.file_stamp = Some(now);
        self.load_flag_file(&path);
    }

    fn load_flag_file(&mut self, path: &Path) {
        match file::load(path) {
            Ok(data) => {
                log::info!(
                    "flag file {} loaded ({} flags)",
                    path.display(),
                    data.flags.len()
                );
                self.store.apply(DataEvent::Put(data));
                self.values.set_origin(Origin::File);
                self.evaluate();
            }
            Err(FlagFileError::Read { source, .. })
                if source.kind() == std::io::ErrorKind::NotFound && self.store.is_empty() =>
            {
                log::warn!(
                    "flag file {} does not exist; serving fallbacks until it does",
                    path.display()
                );
            }
            Err(e) => log::warn!("{e}; keeping the previous flag values"),
        }
    }

    fn load_state_file(&mut self, path: &Path) {
        match std::fs::read(path) {
            Ok(bytes) => match serde_json::from_slice::<AllData>(&bytes) {
                Ok(data) => {
                    log::info!("flag state restored from {}", path.display());
                    self.store.apply(DataEvent::Put(data));
                    self.values.set_origin(Origin::Cached);
                    self.evaluate();
                }
                Err(e) => log::warn!("flag state file {} is not usable: {e}", path.display()),
            },
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => log::warn!("cannot read flag state file {}: {e}", path.display()),
        }
    }

    fn apply_remote(&mut self, event: DataEvent) {
        let initial = matches!(event, DataEvent::Put(_));
        if self.store.apply(event) || initial {
            self.values.set_origin(Origin::Live);
            self.evaluate();
            self.persist();
        }
        if initial {
            self.signal_ready();
        }
    }

    fn remote_state(&mut self, state: SourceState, reason: &str) {
        let previous = self.values.state();
        if previous != state {
            match state {
                SourceState::Valid => log::info!("flag source valid"),
                SourceState::Interrupted => {
                    log::warn!("flag source interrupted: {reason}; serving last values")
                }
                SourceState::Off => {
                    log::error!("flag source off: {reason}; serving last values");
                    self.signal_ready();
                }
                SourceState::Initializing | SourceState::None => {}
            }
        }
        self.values.set_state(state);
    }

    /// Writes the live data set to the state file: temp file, then rename, so a crash never
    /// leaves a half-written file.
    fn persist(&self) {
        let Some(path) = &self.settings.launchdarkly.state_file else {
            return;
        };
        let result = serde_json::to_vec(&self.store.snapshot())
            .map_err(std::io::Error::other)
            .and_then(|bytes| {
                // Unique per process: a worker and a queuer on one host may share the file.
                let mut tmp = path.as_os_str().to_owned();
                tmp.push(format!(".{}.tmp", std::process::id()));
                let tmp = PathBuf::from(tmp);
                std::fs::write(&tmp, bytes)?;
                std::fs::rename(&tmp, path)
            });
        if let Err(e) = result {
            log::warn!("cannot write flag state file {}: {e}", path.display());
        }
    }

    fn reload(&mut self, settings: SourceSettings) {
        // The LaunchDarkly connection is restart-only: `daemon::reload` kept its settings.
        self.settings = settings;
        self.context = build_context(&self.settings);
        // SIGHUP re-reads the flag file even when its stamp looks unchanged.
        if let Some(path) = self.file_path() {
            self.file_stamp = Some(stamp(&path));
            self.load_flag_file(&path);
        }
        self.evaluate();
    }

    /// Evaluates each watched flag for this daemon's context and stores accepted values.
    fn evaluate(&mut self) {
        let watched = [
            (
                Watched::SkipRate,
                self.settings.flags.skip_rate_key.clone(),
                self.settings.flags.skip_rate_fallback,
            ),
            (
                Watched::Rate,
                self.settings.flags.rate_key.clone(),
                self.settings.flags.rate_fallback,
            ),
        ];
        for (index, (which, key, fallback)) in watched.into_iter().enumerate() {
            let problem = match self.evaluate_one(&key) {
                Evaluated::Number(v) => match which.accept(v) {
                    Some(v) => Ok(v),
                    None => Err(format!("value {v} is out of range")),
                },
                Evaluated::Missing => Ok(fallback),
                Evaluated::Bad(why) => Err(why),
            };
            let value = match problem {
                Ok(value) => {
                    self.warned[index] = None;
                    value
                }
                Err(why) => {
                    if self.warned[index].as_ref() != Some(&why) {
                        log::warn!(
                            "flag {key:?}: {why}; keeping {}",
                            which.current(&self.values)
                        );
                        self.warned[index] = Some(why);
                    }
                    continue;
                }
            };
            let before = which.current(&self.values);
            which.store(&self.values, value);
            let after = which.current(&self.values);
            if before != after {
                log::info!("flag {key:?} = {after} ({})", self.values.origin().as_str());
            }
        }
    }

    fn evaluate_one(&self, key: &str) -> Evaluated {
        match &self.context {
            Some(context) => evaluate_number(&self.store, key, context),
            None => Evaluated::Bad("no valid evaluation context".into()),
        }
    }
}

/// The context LaunchDarkly rules see: kind and key from the config, and attributes an
/// operator would target (role, queue, host).
fn build_context(settings: &SourceSettings) -> Option<Context> {
    let flags = &settings.flags;
    let mut builder = ContextBuilder::new(flags.context_key.clone());
    builder
        .kind(flags.context_kind.clone())
        .set_string("role", settings.role)
        .set_string("queue", settings.queue.clone())
        .set_string("host", flags.context_key.clone());
    match builder.build() {
        Ok(context) => Some(context),
        Err(e) => {
            log::error!("flag context is invalid ({e}); flags fall back to defaults");
            None
        }
    }
}
