//! The exec handler: one program run per job, in the manner of `amqp-consume`, with what that
//! lacks: a deadline that is enforced, and a child that knows how much time it has.
//!
//! Per job the child gets
//! - argv from `handler.command` (no shell), the body on stdin;
//! - a clean environment, never the daemon's own (which may hold the SDK key, the notify
//!   socket and the credentials directory): `PATH`, `LANG`, the operator's `handler.env`, and
//!   the job's facts `FLAGSHED_JOB_ID`, `FLAGSHED_JOB_TYPE`, `FLAGSHED_CREATED_MS`,
//!   `FLAGSHED_DEADLINE_MS` and `FLAGSHED_TIME_LEFT_MS` (both absent without a deadline),
//!   `FLAGSHED_REDELIVERED` (0 or 1) and `FLAGSHED_JOB_JSON` (every property and header);
//! - its own process group, so that stopping the job stops everything it started.
//!
//! One pool thread supervises one child with a single `poll(2)` over the child's stdin
//! (written without blocking, so a child that never reads cannot deadlock the thread), its
//! stdout and stderr (read as they come, logged line by line within a byte budget) and a pidfd
//! that becomes readable when the child exits. The poll's timeout is the stop time: then the
//! whole group gets SIGTERM, and SIGKILL `kill_grace` later. Whatever of the group is left when
//! the child exits is killed too (the exited child, not yet reaped, keeps the group id from
//! being reused), so no process outlives its job.
//!
//! Exit status 0 is success, 75 (EX_TEMPFAIL) asks for a retry, anything else (or a signal)
//! is a failure. A program that cannot be started at all (missing, not executable, its `#!`
//! interpreter missing, being replaced) makes the job [`HandlerError::Unavailable`]: nothing
//! ran, and the worker holds its intake until [`Handler::probe`] finds the program startable
//! again.
//!
//! Every wait is bounded by the job's stop time: the spawn runs on a short-lived thread the
//! pool thread waits for no longer than that (a child that starts after all is killed at
//! once), and stdin is written without blocking inside the supervising poll.

use super::output::{JobOutput, OutputLimits, Stream};
use super::{Handler, HandlerError, Job, job_json};
use crate::clock::now_ms;
use std::collections::HashSet;
use std::ffi::OsString;
use std::io::{self, Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::PathBuf;
use std::process::{Child, ChildStdin, Command, ExitStatus, Stdio};
use std::sync::{Arc, Condvar, Mutex, PoisonError};
use std::time::{Duration, Instant};

/// sysexits' EX_TEMPFAIL: "try again later".
pub const EXIT_RETRY: i32 = 75;

/// How long a poll waits at most when the kernel has no pidfd to signal the child's exit.
const EXIT_CHECK_WITHOUT_PIDFD: Duration = Duration::from_millis(5);

/// Log lines of one job's output, unless [`ExecHandler::with_output_limit_lines`] says
/// otherwise: `handler.output_limit_lines`' default.
pub const DEFAULT_OUTPUT_LIMIT_LINES: usize = 100;

/// Runs `program args...` per job.
#[derive(Debug)]
pub struct ExecHandler {
    program: PathBuf,
    args: Vec<OsString>,
    /// Every variable a child gets besides the job's facts.
    env: Vec<(OsString, OsString)>,
    kill_grace: Duration,
    output_limits: OutputLimits,
    /// Process groups of the children running now, for [`Handler::abort_running`].
    running: Mutex<HashSet<libc::pid_t>>,
}

impl ExecHandler {
    /// `program` should be absolute (the config resolves it against the handler's `PATH`);
    /// `env` is the whole environment besides the job's facts.
    pub fn new(
        program: PathBuf,
        args: Vec<OsString>,
        env: Vec<(OsString, OsString)>,
        kill_grace: Duration,
        output_limit_bytes: usize,
    ) -> ExecHandler {
        ExecHandler {
            program,
            args,
            env,
            kill_grace,
            output_limits: OutputLimits {
                bytes: output_limit_bytes,
                lines: DEFAULT_OUTPUT_LIMIT_LINES,
            },
            running: Mutex::new(HashSet::new()),
        }
    }

    /// Logs at most `lines` lines of a job's output (besides the byte limit), so that a child
    /// writing many short lines cannot flood the journal with records.
    #[must_use]
    pub fn with_output_limit_lines(mut self, lines: usize) -> ExecHandler {
        self.output_limits.lines = lines;
        self
    }

    fn running(&self) -> std::sync::MutexGuard<'_, HashSet<libc::pid_t>> {
        self.running.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn command(&self, job: &Job<'_>, now_ms: u64) -> Command {
        let mut command = Command::new(&self.program);
        command
            .args(&self.args)
            .env_clear()
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .env("FLAGSHED_JOB_ID", without_nul(job.id.unwrap_or("")))
            .env("FLAGSHED_JOB_TYPE", without_nul(job.job_type))
            .env("FLAGSHED_CREATED_MS", job.created_ms.to_string())
            .env(
                "FLAGSHED_REDELIVERED",
                if job.redelivered { "1" } else { "0" },
            )
            .env("FLAGSHED_JOB_JSON", job_json(job))
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .process_group(0);
        if let Some(deadline) = job.deadline_ms {
            command
                .env("FLAGSHED_DEADLINE_MS", deadline.to_string())
                .env(
                    "FLAGSHED_TIME_LEFT_MS",
                    deadline.saturating_sub(now_ms).to_string(),
                );
        }
        command
    }
}

impl Handler for ExecHandler {
    fn handle(&self, job: &Job<'_>) -> Result<(), HandlerError> {
        let now = now_ms();
        let stop_at = job.time_to_stop(now).map(|left| Instant::now() + left);
        let child = match spawn_within(self.command(job, now), stop_at) {
            Ok(child) => child,
            Err(Spawn::TimedOut) => return Err(HandlerError::TimedOut),
            Err(Spawn::Failed(e)) => {
                let why = format!("cannot run {}: {e}", self.program.display());
                return Err(if cannot_start(&e) {
                    HandlerError::Unavailable(why)
                } else {
                    HandlerError::Failed(why)
                });
            }
        };
        let group = child.id() as libc::pid_t;
        self.running().insert(group);
        let mut output = JobOutput::new(job.display_id(), self.output_limits);
        let ended = supervise(child, job.body, stop_at, self.kill_grace, &mut output);
        self.running().remove(&group);
        output.finish();
        let (status, timed_out) = ended.map_err(|e| {
            HandlerError::Failed(format!("supervising {}: {e}", self.program.display()))
        })?;
        if timed_out {
            return Err(HandlerError::TimedOut);
        }
        match (status.code(), status.signal()) {
            (Some(0), _) => Ok(()),
            (Some(EXIT_RETRY), _) => Err(HandlerError::Retry(format!("exit status {EXIT_RETRY}"))),
            (Some(code), _) => Err(HandlerError::Failed(format!("exit status {code}"))),
            (None, Some(signal)) => Err(HandlerError::Failed(format!("killed by signal {signal}"))),
            (None, None) => Err(HandlerError::Failed(format!("ended with {status}"))),
        }
    }

    fn abort_running(&self) {
        for &group in self.running().iter() {
            signal_group(group, libc::SIGKILL);
        }
    }

    /// Whether the program could be started now, checked without running it: it is an
    /// executable file, and a `#!` script's interpreter is one too.
    fn probe(&self) -> Result<(), HandlerError> {
        startable(&self.program).map_err(|why| {
            HandlerError::Unavailable(format!("cannot run {}: {why}", self.program.display()))
        })
    }
}

/// Whether a spawn error means the program cannot be started at all (so every job would fail
/// the same way until it is fixed), rather than something about this job or this moment.
fn cannot_start(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::ENOENT | libc::EACCES | libc::ENOEXEC | libc::ETXTBSY | libc::ENOTDIR)
    )
}

/// Checks what `execve(2)` would refuse with one of [`cannot_start`]'s errors: the program
/// and, for a script, its interpreter must be executable files.
fn startable(program: &std::path::Path) -> Result<(), String> {
    executable(program)?;
    let mut head = [0u8; 256];
    let read = std::fs::File::open(program)
        .and_then(|mut f| f.read(&mut head))
        .map_err(|e| e.to_string())?;
    let Some(line) = head[..read].strip_prefix(b"#!") else {
        return Ok(());
    };
    let line = line.split(|&b| b == b'\n').next().unwrap_or_default();
    let interpreter = line
        .split(|b| b.is_ascii_whitespace())
        .find(|word| !word.is_empty())
        .ok_or_else(|| "its #! line names no interpreter".to_owned())?;
    let interpreter = std::path::Path::new(std::ffi::OsStr::from_bytes(interpreter));
    executable(interpreter)
        .map_err(|why| format!("its interpreter {}: {why}", interpreter.display()))
}

/// `access(2)` with `X_OK` on a regular file.
fn executable(path: &std::path::Path) -> Result<(), String> {
    let metadata = std::fs::metadata(path).map_err(|e| e.to_string())?;
    if !metadata.is_file() {
        return Err("not a regular file".to_owned());
    }
    let c_path = std::ffi::CString::new(path.as_os_str().as_bytes())
        .map_err(|_| "its path holds a NUL byte".to_owned())?;
    // SAFETY: access(2) reads a NUL-terminated path we own.
    if unsafe { libc::access(c_path.as_ptr(), libc::X_OK) } != 0 {
        return Err(io::Error::last_os_error().to_string());
    }
    Ok(())
}

/// Why a child was not started.
enum Spawn {
    /// The stop time came first.
    TimedOut,
    Failed(io::Error),
}

/// Where a spawn on its own thread stands, shared with the pool thread that waits for it.
enum SpawnState {
    Waiting,
    Done(io::Result<Child>),
    /// The pool thread stopped waiting: a child that starts now is killed at once.
    GivenUp,
}

/// Starts `command`, waiting no later than `stop_at`. `fork` and `execve` can block (a program
/// on a hung network file system, a machine short of memory), so with a stop time the spawn
/// runs on a thread of its own; if the stop time comes first, the child it may still start
/// is killed with its group and reaped by that thread, so nothing runs for a job given up on.
fn spawn_within(mut command: Command, stop_at: Option<Instant>) -> Result<Child, Spawn> {
    let Some(stop_at) = stop_at else {
        return command.spawn().map_err(Spawn::Failed);
    };
    if Instant::now() >= stop_at {
        return Err(Spawn::TimedOut);
    }
    let shared = Arc::new((Mutex::new(SpawnState::Waiting), Condvar::new()));
    let theirs = Arc::clone(&shared);
    let started = std::thread::Builder::new()
        .name("exec-spawn".into())
        .spawn(move || {
            let result = command.spawn();
            let (state, done) = &*theirs;
            let mut state = state.lock().unwrap_or_else(PoisonError::into_inner);
            if matches!(*state, SpawnState::GivenUp) {
                if let Ok(mut child) = result {
                    signal_group(child.id() as libc::pid_t, libc::SIGKILL);
                    let _ = child.wait();
                }
                return;
            }
            *state = SpawnState::Done(result);
            done.notify_one();
        });
    if let Err(e) = started {
        return Err(Spawn::Failed(e));
    }
    let (state, done) = &*shared;
    let mut state = state.lock().unwrap_or_else(PoisonError::into_inner);
    loop {
        match std::mem::replace(&mut *state, SpawnState::Waiting) {
            SpawnState::Done(result) => return result.map_err(Spawn::Failed),
            SpawnState::Waiting | SpawnState::GivenUp => {}
        }
        let left = stop_at.saturating_duration_since(Instant::now());
        if left.is_zero() {
            *state = SpawnState::GivenUp;
            return Err(Spawn::TimedOut);
        }
        state = done
            .wait_timeout(state, left)
            .unwrap_or_else(PoisonError::into_inner)
            .0;
    }
}

/// Environment values cannot hold NUL; an AMQP string can.
fn without_nul(s: &str) -> String {
    s.replace('\0', "")
}

/// Where the child is in being stopped.
enum Phase {
    Running,
    /// SIGTERM sent; SIGKILL at this instant.
    Terminating(Instant),
    Killed,
}

/// Feeds `body`, logs output, and waits for the child, stopping its group at `stop_at`.
/// Returns its exit status and whether it had to be stopped.
fn supervise(
    mut child: Child,
    body: &[u8],
    stop_at: Option<Instant>,
    kill_grace: Duration,
    output: &mut JobOutput<'_>,
) -> io::Result<(ExitStatus, bool)> {
    let group = child.id() as libc::pid_t;
    let pidfd = pidfd_open(group);
    let mut stdin = child.stdin.take().filter(|_| !body.is_empty());
    let mut stdout = child.stdout.take();
    let mut stderr = child.stderr.take();
    for fd in [
        stdin.as_ref().map(AsRawFd::as_raw_fd),
        stdout.as_ref().map(AsRawFd::as_raw_fd),
        stderr.as_ref().map(AsRawFd::as_raw_fd),
    ]
    .into_iter()
    .flatten()
    {
        set_nonblocking(fd)?;
    }
    let mut written = 0;
    let mut phase = Phase::Running;
    let mut timed_out = false;
    let mut reaped: Option<ExitStatus> = None;
    let mut exited = false;
    while !exited {
        let now = Instant::now();
        match phase {
            Phase::Running if stop_at.is_some_and(|at| now >= at) => {
                signal_group(group, libc::SIGTERM);
                timed_out = true;
                phase = Phase::Terminating(now + kill_grace);
                continue;
            }
            Phase::Terminating(kill_at) if now >= kill_at => {
                signal_group(group, libc::SIGKILL);
                phase = Phase::Killed;
                continue;
            }
            _ => {}
        }
        let wake_at = match phase {
            Phase::Running => stop_at,
            Phase::Terminating(kill_at) => Some(kill_at),
            Phase::Killed => None,
        };
        let mut timeout = wake_at.map(|at| at.saturating_duration_since(now));
        if pidfd.is_none() {
            timeout = Some(timeout.map_or(EXIT_CHECK_WITHOUT_PIDFD, |t| {
                t.min(EXIT_CHECK_WITHOUT_PIDFD)
            }));
        }
        let ready = poll(
            [
                stdin.as_ref().map(|s| (s.as_raw_fd(), libc::POLLOUT)),
                stdout.as_ref().map(|s| (s.as_raw_fd(), libc::POLLIN)),
                stderr.as_ref().map(|s| (s.as_raw_fd(), libc::POLLIN)),
                pidfd.as_ref().map(|fd| (fd.as_raw_fd(), libc::POLLIN)),
            ],
            timeout,
        )?;
        if ready[0] {
            write_some(&mut stdin, body, &mut written);
        }
        if ready[1] {
            read_available(&mut stdout, Stream::Stdout, output);
        }
        if ready[2] {
            read_available(&mut stderr, Stream::Stderr, output);
        }
        if pidfd.is_some() {
            exited = ready[3];
        } else if let Some(status) = child.try_wait()? {
            reaped = Some(status);
            exited = true;
        }
    }
    // What the child left running in its group ends with it.
    signal_group(group, libc::SIGKILL);
    drop(stdin);
    read_available(&mut stdout, Stream::Stdout, output);
    read_available(&mut stderr, Stream::Stderr, output);
    let status = match reaped {
        Some(status) => status,
        None => child.wait()?,
    };
    Ok((status, timed_out))
}

/// Writes what the pipe takes; gives up on stdin (closing it) once the body is written or the
/// child will not take more.
fn write_some(stdin: &mut Option<ChildStdin>, body: &[u8], written: &mut usize) {
    let Some(pipe) = stdin else { return };
    loop {
        match pipe.write(&body[*written..]) {
            Ok(n) => {
                *written += n;
                if *written >= body.len() {
                    *stdin = None;
                    return;
                }
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            // EPIPE: the child closed its stdin or exited; the rest of the body is not wanted.
            Err(_) => {
                *stdin = None;
                return;
            }
        }
    }
}

/// Reads until the pipe is empty; drops it at end of file.
fn read_available<R: Read>(pipe: &mut Option<R>, stream: Stream, output: &mut JobOutput<'_>) {
    let Some(reader) = pipe else { return };
    let mut buf = [0u8; 16 * 1024];
    loop {
        match reader.read(&mut buf) {
            Ok(0) => {
                *pipe = None;
                return;
            }
            Ok(n) => output.feed(stream, &buf[..n]),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
            Err(_) => {
                *pipe = None;
                return;
            }
        }
    }
}

/// `poll(2)` over up to four descriptors; `true` where one is ready (or closed, or in error).
fn poll(
    fds: [Option<(RawFd, libc::c_short)>; 4],
    timeout: Option<Duration>,
) -> io::Result<[bool; 4]> {
    let mut polled = [libc::pollfd {
        fd: -1,
        events: 0,
        revents: 0,
    }; 4];
    for (slot, fd) in polled.iter_mut().zip(fds) {
        if let Some((fd, events)) = fd {
            *slot = libc::pollfd {
                fd,
                events,
                revents: 0,
            };
        }
    }
    // Round up, so the loop does not wake just before the stop time and spin.
    let timeout_ms = timeout.map_or(-1, |t| {
        libc::c_int::try_from(t.as_micros().div_ceil(1000)).unwrap_or(libc::c_int::MAX)
    });
    // SAFETY: `polled` is a valid array of 4 pollfd; negative fds are ignored by poll(2).
    let rc = unsafe { libc::poll(polled.as_mut_ptr(), 4, timeout_ms) };
    if rc < 0 {
        let e = io::Error::last_os_error();
        if e.kind() == io::ErrorKind::Interrupted {
            return Ok([false; 4]);
        }
        return Err(e);
    }
    Ok(polled.map(|p| p.fd >= 0 && p.revents != 0))
}

/// A descriptor that becomes readable when `pid` exits (Linux 5.3 and later); `None` where the
/// kernel has none, and the supervisor then checks for the exit every few milliseconds.
fn pidfd_open(pid: libc::pid_t) -> Option<OwnedFd> {
    // SAFETY: pidfd_open takes a pid and flags and returns a new descriptor or -1.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) };
    let fd = RawFd::try_from(fd).ok().filter(|&fd| fd >= 0)?;
    // SAFETY: the kernel just gave us this descriptor; nothing else owns it.
    Some(unsafe { OwnedFd::from_raw_fd(fd) })
}

fn set_nonblocking(fd: RawFd) -> io::Result<()> {
    // SAFETY: F_GETFL/F_SETFL on a descriptor we own.
    let flags = unsafe { libc::fcntl(fd, libc::F_GETFL) };
    if flags < 0 || unsafe { libc::fcntl(fd, libc::F_SETFL, flags | libc::O_NONBLOCK) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Signals every process in the job's group. The group outlives its leader until the leader
/// is reaped, which (with a pidfd) happens only after this, so the id cannot name someone
/// else's group.
fn signal_group(group: libc::pid_t, signal: libc::c_int) {
    // SAFETY: kill(2) with a negative pid signals that process group; ESRCH (none left) is fine.
    unsafe {
        libc::kill(-group, signal);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_spawn_waits_no_later_than_the_stop_time() {
        let gone = spawn_within(Command::new("/bin/true"), Some(Instant::now()));
        assert!(matches!(gone, Err(Spawn::TimedOut)), "nothing started");
        let in_time = Instant::now() + Duration::from_secs(30);
        match spawn_within(Command::new("/bin/true"), Some(in_time)) {
            Ok(mut child) => assert!(child.wait().expect("reaped").success()),
            Err(_) => panic!("/bin/true did not start"),
        }
        match spawn_within(Command::new("/nonexistent/program"), Some(in_time)) {
            Err(Spawn::Failed(e)) => assert_eq!(e.kind(), io::ErrorKind::NotFound),
            _ => panic!("a missing program started"),
        }
    }
}
