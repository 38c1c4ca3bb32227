//! `kfac-launch -n P [--timeout S] -- program args...`
//!
//! Starts P processes of `program` with `KFAC_RANK`, `KFAC_WORLD_SIZE` and a
//! fresh, unique `KFAC_GROUP` in their environment, prefixes every line they
//! print with `[rank r]`, and when one fails (non-zero exit or killed by a
//! signal) stops the others (SIGTERM, then SIGKILL after a grace period) and
//! exits with the failing status (128 + signal for a signal). With
//! `--timeout S` the whole job is stopped after S seconds (exit 124).

use std::io::{BufRead, BufReader, Write};
use std::os::unix::process::ExitStatusExt;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

const GRACE: Duration = Duration::from_secs(2);

fn usage() -> ! {
    eprintln!("usage: kfac-launch -n P [--timeout SECONDS] -- program [args...]");
    std::process::exit(2)
}

fn code(status: ExitStatus) -> i32 {
    match (status.code(), status.signal()) {
        (Some(c), _) => c,
        (None, Some(s)) => 128 + s,
        _ => 1,
    }
}

fn pump(
    rank: usize,
    src: impl std::io::Read + Send + 'static,
    to_err: bool,
) -> std::thread::JoinHandle<()> {
    std::thread::spawn(move || {
        let r = BufReader::new(src);
        for line in r.split(b'\n') {
            let Ok(line) = line else { break };
            let text = String::from_utf8_lossy(&line);
            if to_err {
                let _ = writeln!(std::io::stderr().lock(), "[rank {rank}] {text}");
            } else {
                let _ = writeln!(std::io::stdout().lock(), "[rank {rank}] {text}");
            }
        }
    })
}

fn signal(child: &Child, sig: i32) {
    // SAFETY: sending a signal to our own, not yet reaped child.
    unsafe { libc::kill(child.id() as i32, sig) };
}

fn stop_all(children: &mut [(usize, Child)]) {
    for (_, c) in children.iter() {
        signal(c, libc::SIGTERM);
    }
    let until = Instant::now() + GRACE;
    while Instant::now() < until
        && children
            .iter_mut()
            .any(|(_, c)| matches!(c.try_wait(), Ok(None)))
    {
        std::thread::sleep(Duration::from_millis(10));
    }
    for (_, c) in children.iter_mut() {
        if matches!(c.try_wait(), Ok(None)) {
            let _ = c.kill();
        }
        let _ = c.wait();
    }
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let mut n: Option<usize> = None;
    let mut timeout: Option<f64> = None;
    let mut i = 0;
    while i < args.len() {
        match args[i].as_str() {
            "-n" | "--np" => {
                n = args.get(i + 1).and_then(|v| v.parse().ok());
                i += 2;
            }
            "--timeout" => {
                timeout = args.get(i + 1).and_then(|v| v.parse().ok());
                i += 2;
            }
            "--" => {
                i += 1;
                break;
            }
            "-h" | "--help" => usage(),
            _ => usage(),
        }
    }
    let (Some(n), Some(prog)) = (n.filter(|n| (1..=1024).contains(n)), args.get(i)) else {
        usage()
    };
    let rest = &args[i + 1..];
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    let group = format!("{}-{:x}", std::process::id(), nanos);

    let mut children: Vec<(usize, Child)> = Vec::new();
    let mut pumps = Vec::new();
    for rank in 0..n {
        let spawned = Command::new(prog)
            .args(rest)
            .env("KFAC_RANK", rank.to_string())
            .env("KFAC_WORLD_SIZE", n.to_string())
            .env("KFAC_GROUP", &group)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn();
        match spawned {
            Ok(mut c) => {
                if let Some(o) = c.stdout.take() {
                    pumps.push(pump(rank, o, false));
                }
                if let Some(e) = c.stderr.take() {
                    pumps.push(pump(rank, e, true));
                }
                children.push((rank, c));
            }
            Err(e) => {
                eprintln!("kfac-launch: cannot start {prog}: {e}");
                stop_all(&mut children);
                std::process::exit(127);
            }
        }
    }

    let deadline = timeout.map(|s| Instant::now() + Duration::from_secs_f64(s.max(0.0)));
    let mut exit = 0;
    let mut running: Vec<bool> = vec![true; n];
    'outer: loop {
        for (k, (rank, c)) in children.iter_mut().enumerate() {
            if !running[k] {
                continue;
            }
            match c.try_wait() {
                Ok(Some(st)) => {
                    running[k] = false;
                    if !st.success() {
                        exit = code(st);
                        eprintln!("kfac-launch: rank {rank} failed ({st}); stopping the others");
                        break 'outer;
                    }
                }
                Ok(None) => {}
                Err(e) => {
                    eprintln!("kfac-launch: waiting for rank {rank}: {e}");
                    exit = 1;
                    break 'outer;
                }
            }
        }
        if running.iter().all(|r| !r) {
            break;
        }
        if deadline.is_some_and(|d| Instant::now() >= d) {
            eprintln!("kfac-launch: timeout; stopping all ranks");
            exit = 124;
            break;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    stop_all(&mut children);
    for p in pumps {
        let _ = p.join();
    }
    std::process::exit(exit);
}
