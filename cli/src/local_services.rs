//! Postgres and Redis spawned from the machine's own binaries into a private data folder, for
//! `hangar dev` when no URLs are given. Each runs in its own process group, so a Ctrl-C on the
//! terminal reaches only hangar, which then stops them in order; a handle dropped without
//! `stop` (an error path) still shuts its server down.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use nix::sys::signal::{Signal, kill, killpg};
use nix::unistd::{Pid, User, geteuid};
use sqlx::Connection;
use tokio::process::{Child, Command};

const READY_TIMEOUT: Duration = Duration::from_secs(30);
const STOP_TIMEOUT: Duration = Duration::from_secs(10);

/// A port that was free a moment ago; should another process take it first, the server fails
/// to start and says so.
pub fn free_port() -> anyhow::Result<u16> {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").context("finding a free port")?;
    Ok(listener.local_addr()?.port())
}

pub struct LocalPostgres {
    server: Server,
    port: u16,
}

impl LocalPostgres {
    /// Starts Postgres on `data_dir` (made by `initdb` on first use) and creates the `hangar`
    /// database if missing. `durable == false` turns fsync off (tests only).
    pub async fn start(data_dir: &Path, port: u16, durable: bool) -> anyhow::Result<LocalPostgres> {
        let bin = pg_bin_dir()?;
        let data_dir = std::path::absolute(data_dir)?;
        let parent = data_dir.parent().context("the data folder has no parent")?;
        std::fs::create_dir_all(parent)
            .with_context(|| format!("creating {}", parent.display()))?;
        // Postgres refuses to run as root; it then runs as the `postgres` user, which must own
        // the data folder and be able to reach it.
        let owner = match geteuid().is_root() {
            true => {
                let user = User::from_name("postgres")?
                    .context("Postgres cannot run as root and there is no `postgres` user")?;
                check_reachable(parent, user.uid.as_raw(), user.gid.as_raw())?;
                Some((user.uid.as_raw(), user.gid.as_raw()))
            }
            false => None,
        };
        let command = |program: &str| {
            let mut command = Command::new(bin.join(program));
            // Our working directory may be closed to the postgres user (e.g. under /root).
            command.current_dir("/").stdin(Stdio::null());
            if let Some((uid, gid)) = owner {
                command.uid(uid).gid(gid);
            }
            command
        };
        let chown = |path: &Path| match owner {
            Some((uid, gid)) => std::os::unix::fs::chown(path, Some(uid), Some(gid))
                .with_context(|| format!("giving {} to the postgres user", path.display())),
            None => Ok(()),
        };

        if !data_dir.join("PG_VERSION").exists() {
            // initdb into a sibling, then rename: a killed initdb leaves no half-made cluster.
            let fresh = data_dir.with_extension("initdb");
            let _ = std::fs::remove_dir_all(&fresh);
            std::fs::create_dir(&fresh).with_context(|| format!("creating {}", fresh.display()))?;
            chown(&fresh)?;
            let mut initdb = command("initdb");
            initdb.arg("-D").arg(&fresh);
            initdb.args(["-A", "trust", "-U", "hangar", "-E", "UTF8", "--locale=C"]);
            if !durable {
                initdb.arg("--no-sync");
            }
            let out = initdb.output().await.context("running initdb")?;
            if !out.status.success() {
                let text = String::from_utf8_lossy(&[out.stdout, out.stderr].concat()).into_owned();
                bail!("initdb failed ({}):\n{text}", out.status);
            }
            let target = data_dir.display();
            let moved = std::fs::rename(&fresh, &data_dir);
            moved.with_context(|| format!("moving the new cluster to {target} (not empty?)"))?;
        }
        let data_dir = std::fs::canonicalize(&data_dir)?;
        let pid_file = data_dir.join("postmaster.pid");
        clear_stale_pid_file(&pid_file, &data_dir, Signal::SIGINT).await?;

        // The socket goes next to the data folder (initdb wants that one empty). We connect over
        // TCP, so a path too long for a socket address just turns sockets off.
        let mut socket_dir = data_dir.clone().into_os_string();
        socket_dir.push("-socket");
        std::fs::create_dir_all(&socket_dir)?;
        chown(Path::new(&socket_dir))?;
        if socket_dir.len() + ".s.PGSQL.65535".len() >= 107 {
            socket_dir.clear();
        }

        let mut postgres = command("postgres");
        postgres.arg("-D").arg(&data_dir).arg("-k").arg(socket_dir);
        postgres.args(["-p", &port.to_string(), "-c", "listen_addresses=127.0.0.1"]);
        if !durable {
            postgres.args(["-c", "fsync=off"]);
        }
        // SIGINT is the fast shutdown; SIGTERM ("smart") would wait for every client to leave,
        // and a pool still held somewhere would stall it until the SIGKILL.
        let log = data_dir.join("postgres.log");
        let mut server = Server::spawn(postgres, "Postgres", Signal::SIGINT, log)?;

        // Ready once a connection succeeds; that connection then creates the database.
        let admin_url = format!("postgres://hangar@127.0.0.1:{port}/postgres");
        let connect = || sqlx::PgConnection::connect(&admin_url);
        let mut conn = server.wait_ready(connect).await?;
        let create = sqlx::query("CREATE DATABASE hangar");
        match create.execute(&mut conn).await {
            Err(sqlx::Error::Database(e)) if e.code().as_deref() == Some("42P04") => {} // exists
            result => {
                result.context("creating the hangar database")?;
            }
        }
        let _ = conn.close().await;
        Ok(LocalPostgres { server, port })
    }

    pub fn url(&self) -> String {
        format!("postgres://hangar@127.0.0.1:{}/hangar", self.port)
    }

    pub async fn stop(self) {
        self.server.stop().await
    }
}

pub struct LocalRedis {
    server: Server,
    port: u16,
}

impl LocalRedis {
    /// Starts Redis with an append-only file in `data_dir`, so dev data survives restarts.
    pub async fn start(data_dir: &Path, port: u16) -> anyhow::Result<LocalRedis> {
        let path = std::env::var_os("PATH").unwrap_or_default();
        let bin = std::env::split_paths(&path)
            .map(|dir| dir.join("redis-server"))
            .find(|p| p.is_file());
        let bin = bin.context("redis-server not found; install it with `apt-get install redis-server` or pass --redis-url")?;
        std::fs::create_dir_all(data_dir)
            .with_context(|| format!("creating {}", data_dir.display()))?;
        let data_dir = std::fs::canonicalize(data_dir)?;
        // Two servers appending to one file would corrupt it: the pid file tells of a leftover.
        let pid_file = data_dir.join("redis.pid");
        clear_stale_pid_file(&pid_file, &data_dir, Signal::SIGTERM).await?;
        let mut redis = Command::new(bin);
        redis.args(["--port", &port.to_string(), "--bind", "127.0.0.1"]);
        redis.args(["--appendonly", "yes", "--save", "", "--daemonize", "no"]);
        redis.arg("--dir").arg(&data_dir);
        redis.arg("--pidfile").arg(&pid_file);
        let log = data_dir.join("redis.log");
        let mut server = Server::spawn(redis, "Redis", Signal::SIGTERM, log)?;
        let url = format!("redis://127.0.0.1:{port}");
        // PING answers LOADING until the append-only file is read back.
        server
            .wait_ready(|| async {
                let mut conn = redis::Client::open(url.as_str())?
                    .get_multiplexed_async_connection()
                    .await?;
                redis::cmd("PING").query_async::<String>(&mut conn).await
            })
            .await?;
        Ok(LocalRedis { server, port })
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    pub async fn stop(self) {
        self.server.stop().await
    }
}

/// A spawned server in its own process group, logging to `log` (truncated at each start, so
/// its tail is about this run).
struct Server {
    child: Option<Child>,
    name: &'static str,
    signal: Signal,
    log: PathBuf,
}

impl Server {
    fn spawn(
        mut command: Command,
        name: &'static str,
        signal: Signal,
        log: PathBuf,
    ) -> anyhow::Result<Server> {
        let file =
            std::fs::File::create(&log).with_context(|| format!("creating {}", log.display()))?;
        command
            .stdout(file.try_clone()?)
            .stderr(file)
            .stdin(Stdio::null());
        command.kill_on_drop(true).process_group(0);
        let child = command.spawn().with_context(|| format!("starting {name}"));
        Ok(Server {
            child: Some(child?),
            name,
            signal,
            log,
        })
    }

    /// Retries `probe` until it succeeds, the server exits or READY_TIMEOUT passes; errors
    /// carry the tail of the server's log, which says why.
    async fn wait_ready<T, E, F>(&mut self, probe: impl Fn() -> F) -> anyhow::Result<T>
    where
        E: std::fmt::Display,
        F: Future<Output = Result<T, E>>,
    {
        let deadline = Instant::now() + READY_TIMEOUT;
        let child = self.child.as_mut().expect("running");
        loop {
            let error = match probe().await {
                Ok(value) => return Ok(value),
                Err(error) => error,
            };
            let problem = match child.try_wait()? {
                Some(status) => format!("exited ({status}) while starting"),
                None if Instant::now() > deadline => {
                    format!("not ready after {READY_TIMEOUT:?} ({error})")
                }
                None => {
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            };
            let text = std::fs::read_to_string(&self.log).unwrap_or_default();
            let lines: Vec<&str> = text.lines().collect();
            let tail = lines[lines.len().saturating_sub(20)..].join("\n");
            let (name, log) = (self.name, self.log.display());
            bail!("{name} {problem}; end of {log}:\n{tail}");
        }
    }

    /// The stop signal, up to STOP_TIMEOUT for the exit, then SIGKILL to its process group
    /// (Postgres backends lead groups of their own, but exit once their postmaster is gone).
    async fn stop(mut self) {
        if let Some(mut child) = self.child.take()
            && let Some(pid) = child.id()
        {
            let _ = kill(Pid::from_raw(pid as i32), self.signal);
            let stopped = tokio::time::timeout(STOP_TIMEOUT, child.wait()).await;
            if stopped.is_err() {
                let name = self.name;
                tracing::warn!(
                    pid,
                    "{name} did not stop within {STOP_TIMEOUT:?}; killing it"
                );
                let _ = killpg(Pid::from_raw(pid as i32), Signal::SIGKILL);
                let _ = child.wait().await;
            }
        }
    }
}

impl Drop for Server {
    /// Dropped without `stop`: the stop signal and a short blocking wait (Drop cannot await),
    /// then `kill_on_drop` SIGKILLs whatever is left. Not SIGKILL first: a killed postmaster
    /// leaves its backends orphaned for a while and its cluster in need of crash recovery.
    fn drop(&mut self) {
        if let Some(child) = self.child.as_mut()
            && let Some(pid) = child.id()
        {
            let _ = kill(Pid::from_raw(pid as i32), self.signal);
            let deadline = Instant::now() + Duration::from_secs(5);
            while matches!(child.try_wait(), Ok(None)) && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(20));
            }
        }
    }
}

/// `HANGAR_PG_BIN`, else the newest /usr/lib/postgresql/*/bin (Debian keeps them off PATH),
/// else PATH: the first folder with both `initdb` and `postgres`.
fn pg_bin_dir() -> anyhow::Result<PathBuf> {
    let has_both = |dir: &Path| dir.join("initdb").is_file() && dir.join("postgres").is_file();
    if let Some(dir) = std::env::var_os("HANGAR_PG_BIN").map(PathBuf::from) {
        let shown = dir.display();
        anyhow::ensure!(
            has_both(&dir),
            "HANGAR_PG_BIN={shown} holds no initdb and postgres"
        );
        return Ok(dir);
    }
    let mut versions: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| Some((e.file_name().to_str()?.parse().ok()?, e.path().join("bin"))))
        .collect();
    versions.sort();
    let path = std::env::var_os("PATH").unwrap_or_default();
    let newest_first = versions.into_iter().rev().map(|(_, dir)| dir);
    let mut candidates = newest_first.chain(std::env::split_paths(&path));
    candidates.find(|dir| has_both(dir)).context(
        "PostgreSQL server binaries not found; install them with `apt-get install postgresql` or pass --database-url",
    )
}

/// Every folder from `dir` up must be searchable by the postgres user, or initdb fails with a
/// bare "Permission denied" (e.g. for a data folder under /root, which is mode 700).
fn check_reachable(dir: &Path, uid: u32, gid: u32) -> anyhow::Result<()> {
    use std::os::unix::fs::MetadataExt;
    for folder in dir.ancestors() {
        let meta = std::fs::metadata(folder)?;
        let bit = if meta.uid() == uid {
            0o100
        } else if meta.gid() == gid {
            0o010
        } else {
            0o001
        };
        if meta.mode() & bit == 0 {
            bail!(
                "Postgres runs as the `postgres` user (hangar runs as root), which cannot enter {}; \
                 choose a data folder it can reach (e.g. --data-dir /var/tmp/hangar-dev) or pass --database-url",
                folder.display()
            );
        }
    }
    Ok(())
}

/// Before a server starts on `data_dir`: if its pid file names a live process working in
/// `data_dir` (both servers chdir there), that is a server left behind by a killed hangar
/// (stopped here) or the server of another running hangar (an error). If it names an unrelated
/// live process (a reused pid), the file is stale and removed: Postgres would refuse to start
/// were that process the postgres user's. A dead pid is left to the server, which handles it
/// (Postgres then also checks that no orphaned backend still uses the old shared memory).
async fn clear_stale_pid_file(
    pid_file: &Path,
    data_dir: &Path,
    signal: Signal,
) -> anyhow::Result<()> {
    let text = std::fs::read_to_string(pid_file).unwrap_or_default();
    let pid: i32 = text
        .lines()
        .next()
        .unwrap_or("")
        .trim()
        .parse()
        .unwrap_or(0);
    if pid <= 0 || proc_stat(pid).is_none() {
        return Ok(());
    }
    let cwd = std::fs::read_link(format!("/proc/{pid}/cwd")).ok();
    if !alive(pid) || cwd.as_deref() != Some(data_dir) {
        let removed = std::fs::remove_file(pid_file);
        return removed.with_context(|| format!("removing stale {}", pid_file.display()));
    }
    let parent = proc_stat(pid).map_or(0, |(_, ppid)| ppid);
    let parent_name = std::fs::read_to_string(format!("/proc/{parent}/comm"));
    if parent_name.is_ok_and(|name| name.starts_with("hangar")) {
        let dir = data_dir.display();
        bail!("{dir} is in use by another hangar (pid {parent}); stop that one first");
    }
    tracing::warn!(pid, dir = %data_dir.display(), "stopping a server left running by an earlier hangar");
    let _ = kill(Pid::from_raw(pid), signal);
    let deadline = Instant::now() + STOP_TIMEOUT;
    while alive(pid) && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    if alive(pid) {
        let _ = killpg(Pid::from_raw(pid), Signal::SIGKILL);
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    Ok(())
}

/// (state, parent pid) from /proc/<pid>/stat; the name may hold spaces, so parse after ')'.
fn proc_stat(pid: i32) -> Option<(char, i32)> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let mut fields = stat.rsplit_once(')')?.1.split_whitespace();
    Some((fields.next()?.chars().next()?, fields.next()?.parse().ok()?))
}

/// Running: present and not a zombie (an orphan's zombie lingers where init does not reap).
fn alive(pid: i32) -> bool {
    proc_stat(pid).is_some_and(|(state, _)| state != 'Z')
}

#[cfg(test)]
mod tests {
    use super::*;

    /// World-searchable (tempfile's default is 700), for the postgres user.
    fn temp_dir() -> tempfile::TempDir {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::Permissions::from_mode(0o755);
        tempfile::Builder::new()
            .prefix("hangar-test-")
            .permissions(mode)
            .tempdir()
            .unwrap()
    }

    /// The server and its children (Postgres backends each lead a process group of their own).
    fn family(server: &Server) -> Vec<i32> {
        let pid = server.child.as_ref().unwrap().id().unwrap() as i32;
        let all = std::fs::read_dir("/proc").unwrap().flatten();
        let all = all.filter_map(|e| e.file_name().to_str()?.parse().ok());
        let children = all.filter(|&p| proc_stat(p).is_some_and(|(_, ppid)| ppid == pid));
        children.chain([pid]).collect()
    }

    /// True once none of `pids` is left, zombies included, within 5 s.
    async fn gone(pids: &[i32]) -> bool {
        for _ in 0..50 {
            if pids.iter().all(|&pid| proc_stat(pid).is_none()) {
                return true;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        false
    }

    #[tokio::test]
    async fn postgres_serves_the_hangar_database_and_stops() {
        let (dir, port) = (temp_dir(), free_port().unwrap());
        let pg = LocalPostgres::start(&dir.path().join("pg"), port, false)
            .await
            .unwrap();
        // Left open on purpose: stopping must not wait for clients.
        let mut conn = sqlx::PgConnection::connect(&pg.url()).await.unwrap();
        let db: String = sqlx::query_scalar("select current_database()")
            .fetch_one(&mut conn)
            .await
            .unwrap();
        assert_eq!(db, "hangar");
        let (pids, started) = (family(&pg.server), Instant::now());
        assert!(pids.len() > 3, "a postmaster and its helpers: {pids:?}");
        pg.stop().await;
        assert!(
            started.elapsed() < STOP_TIMEOUT,
            "a clean stop, not the SIGKILL"
        );
        assert!(gone(&pids).await, "postgres processes left behind");
    }

    #[tokio::test]
    async fn postgres_restarts_despite_stale_pid_files_and_keeps_its_data() {
        let dir = temp_dir();
        let data = dir.path().join("pg");
        let pg = LocalPostgres::start(&data, free_port().unwrap(), true)
            .await
            .unwrap();
        let mut conn = sqlx::PgConnection::connect(&pg.url()).await.unwrap();
        let create = sqlx::query("create table kept as select 7 as n");
        create.execute(&mut conn).await.unwrap();
        let second = LocalPostgres::start(&data, free_port().unwrap(), true).await;
        assert!(format!("{:#}", second.err().unwrap()).contains("another hangar"));
        let pids = family(&pg.server);
        drop(pg); // the error path
        assert!(gone(&pids).await, "postgres processes left behind");

        // A pid file naming a dead process (Postgres copes), then one naming a live process of
        // the postgres user (a reused pid, which would stop Postgres).
        let mut dead = Command::new("true").spawn().unwrap();
        let dead_pid = dead.id().unwrap();
        dead.wait().await.unwrap();
        let mut squatter = Command::new("sleep");
        squatter.arg("30").kill_on_drop(true);
        if let Some(user) = User::from_name("postgres")
            .unwrap()
            .filter(|_| geteuid().is_root())
        {
            squatter.uid(user.uid.as_raw()).gid(user.gid.as_raw());
        }
        let squatter = squatter.spawn().unwrap();
        for stale in [dead_pid, squatter.id().unwrap()] {
            std::fs::write(data.join("postmaster.pid"), format!("{stale}\n")).unwrap();
            let pg = LocalPostgres::start(&data, free_port().unwrap(), true)
                .await
                .unwrap();
            let mut conn = sqlx::PgConnection::connect(&pg.url()).await.unwrap();
            let kept = sqlx::query_scalar::<_, i32>("select n from kept");
            assert_eq!(kept.fetch_one(&mut conn).await.unwrap(), 7);
            let pids = family(&pg.server);
            pg.stop().await;
            assert!(gone(&pids).await, "postgres processes left behind");
        }
    }

    #[tokio::test]
    async fn redis_keeps_its_data_across_restarts_and_stops() {
        let dir = temp_dir();
        let data = dir.path().join("redis");
        for round in 0..2 {
            let redis = LocalRedis::start(&data, free_port().unwrap())
                .await
                .unwrap();
            let client = redis::Client::open(redis.url()).unwrap();
            let mut conn = client.get_multiplexed_async_connection().await.unwrap();
            let pids = family(&redis.server);
            if round == 0 {
                let set = redis::cmd("SET").arg("k").arg("v").clone();
                set.query_async::<()>(&mut conn).await.unwrap();
                redis.stop().await;
            } else {
                let value: String = redis::cmd("GET")
                    .arg("k")
                    .query_async(&mut conn)
                    .await
                    .unwrap();
                assert_eq!(value, "v");
                drop(redis); // the error path
            }
            assert!(gone(&pids).await, "redis left behind");
        }
    }
}
