//! `Exec`: run a program with piped stdio, a deadline and per-stream output limits.
//!
//! One thread, one `poll()` over the child's pipes: stdin is fed and both outputs drained at
//! once, so a child never blocks on a full pipe (output past the limit is read and dropped).
//! A helper thread waits for the child and closes a pipe when it has exited, which wakes the
//! poll (no SIGCHLD handling: signal masks are per thread and the tests run many threads).

use std::io::{self, ErrorKind, Read, Write};
use std::os::fd::{AsFd, BorrowedFd};
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::process::{Child, ChildStdin, Command, ExitStatus, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use hangar_guest::protocol::{ErrorCode, ExecRequest, ExecResult, MAX_FRAME, Response};
use nix::fcntl::{FcntlArg, OFlag, fcntl};
use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
use nix::sys::signal::{Signal, killpg};
use nix::unistd::Pid;

use crate::error_response;

/// After the child exits, how long to keep reading pipes that a surviving grandchild (a
/// background job) still holds open before answering without their EOF.
const EXIT_GRACE: Duration = Duration::from_millis(100);

/// Output kept per stream regardless of `max_output_bytes`: both streams, base64'd, must fit
/// in one frame.
pub const OUTPUT_CAP: usize = MAX_FRAME / 2 / 4 * 3 - 64 * 1024;

pub fn run(req: &ExecRequest) -> Response {
    match run_inner(req) {
        Ok(result) => Response::Exec(result),
        Err(resp) => resp,
    }
}

fn run_inner(req: &ExecRequest) -> Result<ExecResult, Response> {
    let Some(program) = req.argv.first() else {
        return Err(error_response(ErrorCode::Invalid, "empty argv".into()));
    };
    let mut cmd = Command::new(program);
    cmd.args(&req.argv[1..])
        .envs(req.env.iter().map(|(k, v)| (k, v)))
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        // Its own process group, so a timeout kills whatever the program started too.
        .process_group(0);
    if let Some(cwd) = &req.cwd {
        cmd.current_dir(cwd);
    }
    let start = Instant::now();
    let child = cmd.spawn().map_err(|e| {
        let what = match &req.cwd {
            Some(cwd) => format!("{program} (in {cwd})"),
            None => program.clone(),
        };
        crate::io_error_response(&e, &format!("spawn {what}"))
    })?;
    let pgid = Pid::from_raw(child.id() as i32);
    let outcome = supervise(child, req, pgid, start);
    let (status, out) = match outcome {
        Ok(done) => done,
        Err(e) => {
            // Never leave a process behind on an internal error.
            let _ = killpg(pgid, Signal::SIGKILL);
            return Err(crate::io_error_response(&e, "exec"));
        }
    };
    Ok(ExecResult {
        stdout: out.stdout.data,
        stderr: out.stderr.data,
        exit_code: exit_code(status),
        stdout_truncated: out.stdout.truncated,
        stderr_truncated: out.stderr.truncated,
        timed_out: out.timed_out,
        duration_ms: start.elapsed().as_millis() as u64,
    })
}

/// The shell convention: the exit status, or 128 + the signal that killed the process.
fn exit_code(status: ExitStatus) -> i32 {
    match (status.code(), status.signal()) {
        (Some(code), _) => code,
        (None, Some(signal)) => 128 + signal,
        (None, None) => 128,
    }
}

/// One output stream: the kept prefix and whether anything was dropped.
struct Captured {
    data: Vec<u8>,
    limit: usize,
    truncated: bool,
}

impl Captured {
    fn new(limit: u64) -> Self {
        Self {
            data: Vec::new(),
            limit: usize::try_from(limit).unwrap_or(usize::MAX).min(OUTPUT_CAP),
            truncated: false,
        }
    }

    fn push(&mut self, chunk: &[u8]) {
        let room = self.limit.saturating_sub(self.data.len());
        self.data.extend_from_slice(&chunk[..chunk.len().min(room)]);
        self.truncated |= chunk.len() > room;
    }
}

struct Outputs {
    stdout: Captured,
    stderr: Captured,
    timed_out: bool,
}

fn set_nonblocking(fd: BorrowedFd<'_>) -> io::Result<()> {
    let flags = OFlag::from_bits_truncate(fcntl(fd, FcntlArg::F_GETFL)?);
    fcntl(fd, FcntlArg::F_SETFL(flags | OFlag::O_NONBLOCK))?;
    Ok(())
}

/// Reads what `src` has now into `dst`; false once it reached end-of-file.
fn drain(src: &mut impl Read, dst: &mut Captured, chunk: &mut [u8]) -> io::Result<bool> {
    loop {
        match src.read(chunk) {
            Ok(0) => return Ok(false),
            Ok(n) => dst.push(&chunk[..n]),
            Err(e) if e.kind() == ErrorKind::WouldBlock => return Ok(true),
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
}

/// Writes what `stdin` accepts now; true when everything is written (or the child closed it).
fn feed(stdin: &mut ChildStdin, data: &[u8], written: &mut usize) -> io::Result<bool> {
    while *written < data.len() {
        match stdin.write(&data[*written..]) {
            Ok(n) => *written += n,
            Err(e) if e.kind() == ErrorKind::WouldBlock => return Ok(false),
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            // The child does not want the rest: not an error of the exec.
            Err(e) if e.kind() == ErrorKind::BrokenPipe => return Ok(true),
            Err(e) => return Err(e),
        }
    }
    Ok(true)
}

fn supervise(
    mut child: Child,
    req: &ExecRequest,
    pgid: Pid,
    start: Instant,
) -> io::Result<(ExitStatus, Outputs)> {
    let (mut stdout, mut stderr) = (child.stdout.take(), child.stderr.take());
    let mut stdin = child.stdin.take();
    for fd in [
        stdout.as_ref().map(|s| s.as_fd()),
        stderr.as_ref().map(|s| s.as_fd()),
    ]
    .into_iter()
    .flatten()
    .chain(stdin.as_ref().map(|s| s.as_fd()))
    {
        set_nonblocking(fd)?;
    }
    if req.stdin.is_empty() {
        stdin = None;
    }

    // The waiter: reaps the child, sends its status, and closes `exit_w` (waking our poll).
    let (exit_r, exit_w) = io::pipe()?;
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(child.wait());
        drop(exit_w);
    });

    let deadline = start + Duration::from_millis(req.timeout_ms);
    let mut out = Outputs {
        stdout: Captured::new(req.max_output_bytes),
        stderr: Captured::new(req.max_output_bytes),
        timed_out: false,
    };
    let mut status: Option<(ExitStatus, Instant)> = None;
    let mut written = 0usize;
    let mut chunk = vec![0u8; 64 * 1024];
    loop {
        if let Some((st, exited_at)) = status {
            let open = stdout.is_some() || stderr.is_some();
            if !open || exited_at.elapsed() >= EXIT_GRACE {
                // A last look at whatever is already buffered, then answer.
                if let Some(s) = stdout.as_mut() {
                    drain(s, &mut out.stdout, &mut chunk)?;
                }
                if let Some(s) = stderr.as_mut() {
                    drain(s, &mut out.stderr, &mut chunk)?;
                }
                return Ok((st, out));
            }
        }
        let now = Instant::now();
        if status.is_none() && !out.timed_out && now >= deadline {
            // The whole group: background jobs would otherwise hold the pipes open.
            let _ = killpg(pgid, Signal::SIGKILL);
            out.timed_out = true;
        }
        let wake_at = match status {
            Some((_, exited_at)) => exited_at + EXIT_GRACE,
            None if out.timed_out => now + Duration::from_secs(1),
            None => deadline,
        };
        let wait = wake_at.saturating_duration_since(now);
        let timeout = PollTimeout::try_from(wait.as_millis().max(1)).unwrap_or(PollTimeout::MAX);

        let mut fds = Vec::with_capacity(4);
        let waiting_exit = status.is_none();
        if waiting_exit {
            fds.push(PollFd::new(exit_r.as_fd(), PollFlags::POLLIN));
        }
        let slots = [
            stdout.as_ref().map(|s| (s.as_fd(), PollFlags::POLLIN)),
            stderr.as_ref().map(|s| (s.as_fd(), PollFlags::POLLIN)),
            stdin.as_ref().map(|s| (s.as_fd(), PollFlags::POLLOUT)),
        ];
        for (fd, flags) in slots.iter().flatten() {
            fds.push(PollFd::new(*fd, *flags));
        }
        match poll(&mut fds, timeout) {
            Ok(_) => {}
            Err(nix::errno::Errno::EINTR) => continue,
            Err(e) => return Err(e.into()),
        }
        let ready: Vec<bool> = fds
            .iter()
            .map(|f| f.revents().is_some_and(|r| !r.is_empty()))
            .collect();
        drop(fds);
        // One flag per fd pushed above, in the same order.
        let mut ready = ready.into_iter();
        let mut next = |present: bool| present && ready.next() == Some(true);
        if next(waiting_exit)
            && let Ok(st) = rx.try_recv()
        {
            status = Some((st?, Instant::now()));
        }
        if next(stdout.is_some()) && !drain(stdout.as_mut().unwrap(), &mut out.stdout, &mut chunk)?
        {
            stdout = None;
        }
        if next(stderr.is_some()) && !drain(stderr.as_mut().unwrap(), &mut out.stderr, &mut chunk)?
        {
            stderr = None;
        }
        if next(stdin.is_some()) && feed(stdin.as_mut().unwrap(), &req.stdin, &mut written)? {
            stdin = None; // closing it is the child's end-of-file
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req(argv: &[&str]) -> ExecRequest {
        ExecRequest {
            argv: argv.iter().map(|s| s.to_string()).collect(),
            env: Vec::new(),
            cwd: None,
            stdin: Vec::new(),
            timeout_ms: 10_000,
            max_output_bytes: 1 << 20,
        }
    }

    fn ok(req: &ExecRequest) -> ExecResult {
        match run(req) {
            Response::Exec(r) => r,
            other => panic!("expected exec result, got {other:?}"),
        }
    }

    #[test]
    fn echo_env_and_cwd() {
        let r = ok(&req(&["echo", "hi"]));
        assert_eq!((r.stdout.as_slice(), r.exit_code), (&b"hi\n"[..], 0));
        assert!(!r.timed_out && !r.stdout_truncated && !r.stderr_truncated);

        let mut q = req(&["sh", "-c", "echo $A; pwd; echo err >&2"]);
        q.env = vec![("A".into(), "from-env".into())];
        q.cwd = Some("/tmp".into());
        let r = ok(&q);
        assert_eq!(r.stdout, b"from-env\n/tmp\n");
        assert_eq!(r.stderr, b"err\n");
    }

    #[test]
    fn exit_codes_and_signals() {
        assert_eq!(ok(&req(&["sh", "-c", "exit 7"])).exit_code, 7);
        assert_eq!(ok(&req(&["false"])).exit_code, 1);
        assert_eq!(ok(&req(&["sh", "-c", "kill -TERM $$"])).exit_code, 128 + 15);
    }

    #[test]
    fn timeout_kills_the_whole_group() {
        let mut q = req(&["sh", "-c", "sleep 30 & sleep 30; echo never"]);
        q.timeout_ms = 300;
        let start = Instant::now();
        let r = ok(&q);
        assert!(r.timed_out);
        assert_eq!(r.exit_code, 128 + 9);
        assert!(r.stdout.is_empty());
        // The background sleep held stdout too: it died with the group, so no grace wait.
        assert!(
            start.elapsed() < Duration::from_secs(3),
            "{:?}",
            start.elapsed()
        );
        assert!((300..3000).contains(&r.duration_ms), "{}", r.duration_ms);
    }

    #[test]
    fn background_jobs_do_not_hold_the_answer() {
        // The child exits at once; its background job keeps the pipes open for 30 s.
        let q = req(&["sh", "-c", "sleep 30 & echo started"]);
        let start = Instant::now();
        let r = ok(&q);
        assert_eq!(r.stdout, b"started\n");
        assert_eq!(r.exit_code, 0);
        assert!(
            start.elapsed() < Duration::from_secs(3),
            "{:?}",
            start.elapsed()
        );
    }

    #[test]
    fn output_is_truncated_per_stream_and_drained() {
        // 1 MiB on each stream, far past a pipe's buffer: the child must not block.
        let mut q = req(&[
            "sh",
            "-c",
            "head -c 1048576 /dev/zero; head -c 1048576 /dev/zero >&2; echo done >&2",
        ]);
        q.max_output_bytes = 10;
        let r = ok(&q);
        assert_eq!(r.exit_code, 0);
        assert_eq!(r.stdout, vec![0u8; 10]);
        assert_eq!(r.stderr, vec![0u8; 10]);
        assert!(r.stdout_truncated && r.stderr_truncated);
        assert!(!r.timed_out);
        // Exactly at the limit is not truncated.
        let mut q = req(&["printf", "12345"]);
        q.max_output_bytes = 5;
        let r = ok(&q);
        assert_eq!(
            (r.stdout.as_slice(), r.stdout_truncated),
            (&b"12345"[..], false)
        );
    }

    #[test]
    fn stdin_is_fed_even_when_large() {
        let mut q = req(&["cat"]);
        q.stdin = b"hello\x00world".to_vec();
        assert_eq!(ok(&q).stdout, b"hello\x00world");
        // Larger than a pipe buffer in both directions at once.
        let big: Vec<u8> = (0..3_000_000u32).map(|i| i as u8).collect();
        let mut q = req(&["cat"]);
        q.stdin = big.clone();
        q.max_output_bytes = 4 << 20;
        let r = ok(&q);
        assert_eq!(r.stdout.len(), big.len());
        assert!(r.stdout == big);
        // A child that ignores its stdin is not an error.
        let mut q = req(&["true"]);
        q.stdin = big;
        assert_eq!(ok(&q).exit_code, 0);
    }

    #[test]
    fn missing_program_and_bad_requests() {
        let code = |r: Response| match r {
            Response::Error { code, .. } => code,
            other => panic!("expected an error, got {other:?}"),
        };
        assert_eq!(
            code(run(&req(&["no-such-program-xyz"]))),
            ErrorCode::NotFound
        );
        assert_eq!(code(run(&req(&[]))), ErrorCode::Invalid);
        let mut q = req(&["true"]);
        q.cwd = Some("/no/such/dir".into());
        assert_eq!(code(run(&q)), ErrorCode::NotFound);
    }
}
