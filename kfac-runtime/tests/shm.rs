//! The shared-memory group across real processes (started by `kfac-launch`,
//! which re-runs this test binary with `KFAC_TEST_ROLE` set).

use std::os::unix::process::ExitStatusExt;
use std::process::Command;
use std::time::{Duration, Instant};

use kfac_runtime::comm::shm::{segment_exists, ShmGroup, ShmOptions};
use kfac_runtime::comm::{CommError, Communicator};
use kfac_test_support::worker;

const LAUNCH: &str = env!("CARGO_BIN_EXE_kfac-launch");

/// Deterministic per-rank data.
fn val(rank: usize, i: usize) -> f32 {
    ((rank * 7919 + i * 31) % 1009) as f32 * 0.001 - 0.3
}

fn opts(slot: usize, timeout_ms: u64) -> ShmOptions {
    ShmOptions {
        timeout: Duration::from_millis(timeout_ms),
        slot_bytes: slot,
    }
}

/// The worker side, run by the tests below (never on its own).
#[test]
#[ignore = "worker entry: run by its parent test"]
fn worker_entry() {
    let role = worker::role("KFAC_TEST_ROLE");
    if role == "job" {
        return job_worker();
    }
    if role == "hold" {
        // Rank 0 waiting for peers that never come, until a signal.
        let _ = ShmGroup::from_env(opts(4096, 60_000));
        std::process::exit(2);
    }
    let slot: usize = std::env::var("KFAC_TEST_SLOT")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(4096);
    let mut g = ShmGroup::from_env(opts(slot, 5000)).expect("join");
    let (rank, world) = (g.rank(), g.size());
    match role.as_str() {
        "collectives" => {
            for len in [0usize, 1, 7, 1023, 1024, 1025, 5000, 20_001] {
                // allreduce f32: sum in rank order, bitwise
                let mut v: Vec<f32> = (0..len).map(|i| val(rank, i)).collect();
                g.allreduce_f32(&mut v).unwrap();
                for (i, x) in v.iter().enumerate() {
                    let mut want = val(0, i);
                    for r in 1..world {
                        want += val(r, i);
                    }
                    assert_eq!(x.to_bits(), want.to_bits(), "allreduce len {len} at {i}");
                }
                // f64
                let mut d: Vec<f64> = (0..len).map(|i| val(rank, i) as f64 * 1.5).collect();
                g.allreduce_f64(&mut d).unwrap();
                for (i, x) in d.iter().enumerate() {
                    let mut want = val(0, i) as f64 * 1.5;
                    for r in 1..world {
                        want += val(r, i) as f64 * 1.5;
                    }
                    assert_eq!(x.to_bits(), want.to_bits());
                }
                // reduce to the last rank
                let root = world - 1;
                let mut v: Vec<f32> = (0..len).map(|i| val(rank, i)).collect();
                g.reduce_f32(&mut v, root).unwrap();
                for (i, x) in v.iter().enumerate() {
                    let want = if rank == root {
                        (0..world).map(|r| val(r, i)).fold(0.0f32, |a, b| a + b)
                    } else {
                        val(rank, i)
                    };
                    // fold from 0.0: 0 + v0 == v0 exactly, same order
                    assert_eq!(x.to_bits(), want.to_bits(), "reduce len {len}");
                }
                // broadcast from rank 1 % world
                let root = 1 % world;
                let mut b: Vec<f32> = (0..len).map(|i| val(rank, i)).collect();
                g.broadcast_f32(&mut b, root).unwrap();
                assert!(b
                    .iter()
                    .enumerate()
                    .all(|(i, x)| x.to_bits() == val(root, i).to_bits()));
                // allgather with per-rank sizes
                let mine: Vec<u8> = (0..len + rank * 3).map(|i| (i + rank) as u8).collect();
                let (all, sizes) = g.allgather_bytes(&mine).unwrap();
                let mut off = 0;
                for (r, &s) in sizes.iter().enumerate() {
                    assert_eq!(s, len + r * 3);
                    assert!(all[off..off + s]
                        .iter()
                        .enumerate()
                        .all(|(i, &x)| x == (i + r) as u8));
                    off += s;
                }
                // allgather into the caller's buffer (equal sizes)
                let mine: Vec<u8> = (0..len).map(|i| (i * 3 + rank) as u8).collect();
                let mut into = vec![0u8; len * world];
                g.allgather_into(&mine, &mut into).unwrap();
                for r in 0..world {
                    assert!(into[r * len..(r + 1) * len]
                        .iter()
                        .enumerate()
                        .all(|(i, &x)| x == (i * 3 + r) as u8));
                }
                g.barrier().unwrap();
            }
            // unequal contributions to allgather_into fail on every rank
            let mine = vec![7u8; 5 + rank];
            let mut into = vec![0u8; (5 + rank) * world];
            let e = g.allgather_into(&mine, &mut into).unwrap_err();
            assert!(matches!(e, CommError::InvalidArgument { .. }), "{e}");
            // mismatched lengths are an error on every rank, not a hang
            let mut v = vec![1.0f32; 10 + rank];
            let e = g.allreduce_f32(&mut v).unwrap_err();
            assert!(matches!(e, CommError::InvalidArgument { .. }), "{e}");
            g.barrier().unwrap();
            println!("collectives ok");
        }
        "kill" => {
            if rank == 1 {
                std::thread::spawn(|| {
                    std::thread::sleep(Duration::from_millis(30));
                    // SAFETY: killing ourselves.
                    unsafe { libc::raise(libc::SIGKILL) };
                });
            }
            let t0 = Instant::now();
            let mut v = vec![1.0f32; 1 << 16];
            let err = loop {
                if let Err(e) = g.allreduce_f32(&mut v) {
                    break e;
                }
            };
            let named = matches!(
                &err,
                CommError::PeerDied { rank: 1, .. }
                    | CommError::Aborted {
                        blamed: Some(1),
                        ..
                    }
            );
            println!(
                "rank {rank} error after {:.3} s: {err}",
                t0.elapsed().as_secs_f64()
            );
            std::process::exit(if named { 3 } else { 4 });
        }
        other => panic!("unknown role {other}"),
    }
    worker::done(&role);
}

/// Joins with `KFAC_JOB_ID`, then reports the sum of `KFAC_TEST_TAG` over
/// the group it joined (or the join error) and its exit.
fn job_worker() {
    let tag: f64 = std::env::var("KFAC_TEST_TAG").unwrap().parse().unwrap();
    let ms: u64 = std::env::var("KFAC_TEST_TIMEOUT_MS")
        .unwrap()
        .parse()
        .unwrap();
    match ShmGroup::from_env(opts(4096, ms)) {
        Ok(mut g) => {
            let mut v = [tag];
            g.allreduce_f64(&mut v).unwrap();
            println!("joined world {} sum {}", g.size(), v[0]);
        }
        Err(e) => println!("refused: {e}"),
    }
    worker::done("job");
}

fn launch(n: usize, role: &str, slot: usize) -> (std::process::Output, Duration, u32) {
    let t0 = Instant::now();
    let child = Command::new(LAUNCH)
        .args(["-n", &n.to_string(), "--timeout", "60", "--"])
        .arg(std::env::current_exe().unwrap())
        .args(worker::args("worker_entry"))
        .env("KFAC_TEST_ROLE", role)
        .env("KFAC_TEST_SLOT", slot.to_string())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let pid = child.id();
    let out = child.wait_with_output().unwrap();
    (out, t0.elapsed(), pid)
}

fn no_segments_of(launcher_pid: u32) -> bool {
    let prefix = format!("kfac-{launcher_pid}-");
    std::fs::read_dir("/dev/shm")
        .map(|d| {
            d.flatten()
                .all(|e| !e.file_name().to_string_lossy().starts_with(&prefix))
        })
        .unwrap_or(true)
}

#[test]
fn collectives_of_all_sizes_across_processes() {
    for n in [2, 3, 4] {
        let (out, _, pid) = launch(n, "collectives", 4096);
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success(),
            "P={n}: {stdout}\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert_eq!(stdout.matches("collectives ok").count(), n, "{stdout}");
        worker::assert_ran(&stdout, "collectives", n);
        for r in 0..n {
            let prefix = format!("[rank {r}] ");
            assert!(
                stdout
                    .lines()
                    .any(|l| l.starts_with(&prefix) && l.contains("collectives ok")),
                "{stdout}"
            );
        }
        assert!(no_segments_of(pid));
    }
}

#[test]
fn concurrent_groups_do_not_interfere() {
    let a = std::thread::spawn(|| launch(2, "collectives", 4096));
    let b = std::thread::spawn(|| launch(3, "collectives", 8192));
    for (n, (out, _, _)) in [(2, a.join().unwrap()), (3, b.join().unwrap())] {
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(out.status.success(), "{stdout}");
        worker::assert_ran(&stdout, "collectives", n);
    }
}

#[test]
fn sigkilled_rank_is_named_by_every_survivor_and_leaves_nothing() {
    // Started directly (not through the launcher, which would stop the
    // survivors as soon as rank 1 dies) so that every survivor's own
    // detection is observed.
    let group = format!("killtest-{}", std::process::id());
    let t0 = Instant::now();
    let children: Vec<_> = (0..3)
        .map(|r| {
            Command::new(std::env::current_exe().unwrap())
                .args(worker::args("worker_entry"))
                .env("KFAC_TEST_ROLE", "kill")
                .env("KFAC_RANK", r.to_string())
                .env("KFAC_WORLD_SIZE", "3")
                .env("KFAC_GROUP", &group)
                .stdout(std::process::Stdio::piped())
                .spawn()
                .unwrap()
        })
        .collect();
    let outs: Vec<_> = children
        .into_iter()
        .map(|c| c.wait_with_output().unwrap())
        .collect();
    let took = t0.elapsed();
    assert_eq!(outs[1].status.signal(), Some(libc::SIGKILL));
    for r in [0, 2] {
        let stdout = String::from_utf8_lossy(&outs[r].stdout);
        // exit code 3: the error named rank 1 (4 would be any other error)
        assert_eq!(outs[r].status.code(), Some(3), "rank {r}: {stdout}");
        let line = stdout.lines().find(|l| l.contains("error after")).unwrap();
        let secs: f64 = line
            .split("error after ")
            .nth(1)
            .and_then(|t| t.split(' ').next())
            .and_then(|v| v.parse().ok())
            .unwrap();
        // the group timeout is 5 s: named within timeout + 1 s
        assert!(secs < 6.0, "{line}");
    }
    assert!(took < Duration::from_secs(10), "took {took:?}");
    assert!(!segment_exists(&group), "segment left in /dev/shm");

    // Through the launcher: it exits non-zero and leaves nothing behind.
    let (out, _, pid) = launch(3, "kill", 4096);
    assert!(!out.status.success());
    assert!(no_segments_of(pid), "segment left in /dev/shm");
}

fn unique(tag: &str) -> String {
    format!(
        "test-{tag}-{}-{}",
        std::process::id(),
        Instant::now().elapsed().as_nanos()
    )
}

/// Writes a fake segment with the given header words (layout version 2:
/// a 256-byte header, the creator's pid at byte 56).
fn write_segment(group: &str, magic: u64, version: u32, world: u32, pid: i32) {
    let mut b = vec![0u8; 256 + 128 * world as usize + 8192];
    b[0..8].copy_from_slice(&magic.to_le_bytes());
    b[8..12].copy_from_slice(&version.to_le_bytes());
    b[12..16].copy_from_slice(&world.to_le_bytes());
    b[16..24].copy_from_slice(&4096u64.to_le_bytes());
    b[32..36].copy_from_slice(&1u32.to_le_bytes()); // ready
    b[56..60].copy_from_slice(&pid.to_le_bytes()); // creator
    b[256..260].copy_from_slice(&pid.to_le_bytes()); // rank 0
    std::fs::write(format!("/dev/shm/kfac-{group}"), b).unwrap();
}

fn dead_pid() -> i32 {
    let mut c = Command::new("true").spawn().unwrap();
    let pid = c.id() as i32;
    c.wait().unwrap();
    pid
}

fn setup_err(r: Result<ShmGroup, CommError>) -> String {
    match r {
        Err(CommError::Setup { reason }) => reason,
        Err(e) => panic!("wrong error: {e}"),
        Ok(_) => panic!("joined a bad segment"),
    }
}

#[test]
fn stale_segment_of_a_dead_creator_is_replaced_by_the_next_group() {
    let g = unique("stale");
    write_segment(&g, kfac_runtime::comm::shm::MAGIC, 2, 2, dead_pid());
    // rank 1 first: it must wait for the replacement, not join the stale one
    let g1 = g.clone();
    let r1 = std::thread::spawn(move || {
        let mut grp = ShmGroup::join_job(&g1, 1, 2, Some("j"), opts(4096, 10_000))?;
        let mut v = [2.0f32];
        grp.allreduce_f32(&mut v)?;
        Ok::<f32, CommError>(v[0])
    });
    std::thread::sleep(Duration::from_millis(20));
    let mut grp = ShmGroup::join_job(&g, 0, 2, Some("j"), opts(4096, 10_000)).unwrap();
    let mut v = [1.0f32];
    grp.allreduce_f32(&mut v).unwrap();
    assert_eq!(v[0], 3.0);
    assert_eq!(r1.join().unwrap().unwrap(), 3.0);
    drop(grp);
    assert!(!segment_exists(&g), "segment left in /dev/shm");
}

#[test]
fn two_jobs_racing_over_a_stale_segment_never_mix_and_leave_nothing() {
    for round in 0..3 {
        let g = unique(&format!("race{round}"));
        write_segment(&g, kfac_runtime::comm::shm::MAGIC, 2, 2, dead_pid());
        let hs: Vec<_> = [
            (0, "a", 1.0),
            (0, "b", 100.0),
            (1, "a", 1.0),
            (1, "b", 100.0),
        ]
        .into_iter()
        .map(|(rank, job, tag)| {
            let g = g.clone();
            std::thread::spawn(move || {
                let mut grp = ShmGroup::join_job(&g, rank, 2, Some(job), opts(4096, 3000))?;
                let mut v = [tag];
                grp.allreduce_f64(&mut v)?;
                Ok::<(&str, f64, f64), CommError>((job, tag, v[0]))
            })
        })
        .collect();
        let mut joined = Vec::new();
        for h in hs {
            if let Ok((job, tag, sum)) = h.join().unwrap() {
                assert_eq!(sum, 2.0 * tag, "round {round}: job {job} in a mixed group");
                joined.push(job);
            }
        }
        let count = |job| joined.iter().filter(|&&j| j == job).count();
        let (a, b) = (count("a"), count("b"));
        assert!(a + b >= 2 && a != 1 && b != 1, "round {round}: {joined:?}");
        assert!(
            !segment_exists(&g),
            "round {round}: segment left in /dev/shm"
        );
    }
}

#[test]
fn job_ids_are_checked_at_join_and_validated() {
    let g = unique("jobid");
    let g0 = g.clone();
    let r0 = std::thread::spawn(move || {
        ShmGroup::join_job(&g0, 0, 2, Some("job-a"), opts(4096, 1500)).map(|_| ())
    });
    let t0 = Instant::now();
    while !segment_exists(&g) && t0.elapsed() < Duration::from_secs(10) {
        std::thread::sleep(Duration::from_millis(2));
    }
    for (job, label) in [(Some("job-b"), "job id \"job-b\""), (None, "no job id")] {
        let why = setup_err(ShmGroup::join_job(&g, 1, 2, job, opts(4096, 500)));
        assert!(
            why.contains("another job") && why.contains("job id \"job-a\"") && why.contains(label),
            "{why}"
        );
    }
    assert!(r0.join().unwrap().is_err(), "rank 0 alone must time out");
    assert!(!segment_exists(&g));
    for bad in ["", "has space", "\u{e9}", &"x".repeat(65)] {
        let why = setup_err(ShmGroup::join_job(
            &unique("badid"),
            0,
            1,
            Some(bad),
            opts(4096, 500),
        ));
        assert!(why.contains("job id"), "{why}");
    }
}

/// The test binary as one rank of `group`, role `role`, piped stdout.
fn spawn_rank(role: &str, group: &str, rank: usize, env: &[(&str, &str)]) -> std::process::Child {
    Command::new(std::env::current_exe().unwrap())
        .args(worker::args("worker_entry"))
        .env("KFAC_TEST_ROLE", role)
        .env("KFAC_RANK", rank.to_string())
        .env("KFAC_WORLD_SIZE", "2")
        .env("KFAC_GROUP", group)
        .env_remove("KFAC_JOB_ID")
        .envs(env.iter().copied())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap()
}

/// A rank of job `job` (tag: its contribution to the sum) with a
/// `timeout_ms` group timeout.
fn spawn_job_rank(
    group: &str,
    rank: usize,
    job: &str,
    tag: &str,
    timeout_ms: &str,
) -> std::process::Child {
    spawn_rank(
        "job",
        group,
        rank,
        &[
            ("KFAC_JOB_ID", job),
            ("KFAC_TEST_TAG", tag),
            ("KFAC_TEST_TIMEOUT_MS", timeout_ms),
        ],
    )
}

fn job_output(c: std::process::Child) -> String {
    let out = c.wait_with_output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(out.status.success(), "{}: {stdout}", out.status);
    worker::assert_ran(&stdout, "job", 1);
    stdout
}

fn wait_for_segment(group: &str) {
    let t0 = Instant::now();
    while !segment_exists(group) {
        assert!(
            t0.elapsed() < Duration::from_secs(30),
            "no segment for {group}"
        );
        std::thread::sleep(Duration::from_millis(2));
    }
}

#[test]
fn segment_of_a_killed_waiting_rank0_is_replaced_by_the_next_job() {
    for sig in [libc::SIGKILL, libc::SIGTERM, libc::SIGINT] {
        let group = unique(&format!("killed0-{sig}"));
        let mut lone = spawn_rank("hold", &group, 0, &[]);
        wait_for_segment(&group);
        // SAFETY: signalling our own child.
        unsafe { libc::kill(lone.id() as i32, sig) };
        assert_eq!(lone.wait().unwrap().signal(), Some(sig));
        assert!(
            segment_exists(&group),
            "signal {sig}: nothing was left to replace"
        );
        let next: Vec<_> = (0..2)
            .map(|r| spawn_job_rank(&group, r, "next", "1", "20000"))
            .collect();
        for c in next {
            let stdout = job_output(c);
            assert!(
                stdout.contains("joined world 2 sum 2"),
                "signal {sig}: {stdout}"
            );
        }
        assert!(
            !segment_exists(&group),
            "signal {sig}: segment left in /dev/shm"
        );
    }
}

#[test]
fn a_rank_of_another_job_with_the_same_group_name_is_refused() {
    let group = unique("twojobs");
    let a0 = spawn_job_rank(&group, 0, "job-a", "1", "20000");
    wait_for_segment(&group);
    // rank 1 of job b comes first: it must not join job a's group
    let b1 = job_output(spawn_job_rank(&group, 1, "job-b", "1000", "20000"));
    assert!(
        b1.contains("refused") && b1.contains("\"job-a\"") && b1.contains("\"job-b\""),
        "{b1}"
    );
    let a1 = spawn_job_rank(&group, 1, "job-a", "1", "20000");
    for c in [a0, a1] {
        let stdout = job_output(c);
        assert!(stdout.contains("joined world 2 sum 2"), "{stdout}");
    }
    assert!(!segment_exists(&group), "segment left in /dev/shm");
}

#[test]
fn two_jobs_started_at_once_with_one_group_name_never_mix() {
    let group = unique("atonce");
    let t0 = Instant::now();
    let ranks: Vec<_> = [
        (0, "job-a", "1"),
        (1, "job-b", "1000"),
        (1, "job-a", "1"),
        (0, "job-b", "1000"),
    ]
    .into_iter()
    .map(|(r, job, tag)| (job, tag, spawn_job_rank(&group, r, job, tag, "6000")))
    .collect();
    let mut joined = Vec::new();
    for (job, tag, c) in ranks {
        let stdout = job_output(c);
        // (libtest may print "test worker_entry ... " before it on the line)
        let after = |what: &str| stdout.lines().find_map(|l| l.find(what).map(|i| &l[i..]));
        if let Some(line) = after("joined") {
            let want = format!("joined world 2 sum {}", 2 * tag.parse::<u32>().unwrap());
            assert_eq!(line, want, "{job}: a mixed group");
            joined.push(job);
        } else {
            let line = after("refused: ").unwrap_or_else(|| panic!("{stdout}"));
            if line.contains("another job") {
                assert!(
                    line.contains("\"job-a\"") && line.contains("\"job-b\""),
                    "{line}"
                );
            }
        }
    }
    // One job always wins the name and both of its ranks join (the other
    // may too, after the winner unlinked the name); never one rank alone.
    let count = |job| joined.iter().filter(|&&j| j == job).count();
    let (a, b) = (count("job-a"), count("job-b"));
    assert!(a + b >= 2 && a != 1 && b != 1, "{joined:?}");
    assert!(
        t0.elapsed() < Duration::from_secs(40),
        "took {:?}",
        t0.elapsed()
    );
    assert!(!segment_exists(&group), "segment left in /dev/shm");
}

#[test]
fn foreign_or_incompatible_segments_are_refused() {
    let g = unique("foreign");
    write_segment(&g, 0x1234_5678, 1, 2, 1);
    assert!(setup_err(ShmGroup::join(&g, 1, 2, opts(4096, 500))).contains("foreign"));
    assert!(setup_err(ShmGroup::join(&g, 0, 2, opts(4096, 500))).contains("foreign"));
    std::fs::remove_file(format!("/dev/shm/kfac-{g}")).unwrap();

    let g = unique("version");
    write_segment(&g, kfac_runtime::comm::shm::MAGIC, 99, 2, 1);
    assert!(setup_err(ShmGroup::join(&g, 1, 2, opts(4096, 500))).contains("layout version 99"));
    std::fs::remove_file(format!("/dev/shm/kfac-{g}")).unwrap();
}

#[test]
fn wrong_world_size_is_refused_and_rank0_times_out_cleanly() {
    let g = unique("world");
    let g2 = g.clone();
    let r0 = std::thread::spawn(move || ShmGroup::join(&g2, 0, 2, opts(4096, 800)).map(|_| ()));
    // wait for rank 0's segment
    let t0 = Instant::now();
    while !segment_exists(&g) && t0.elapsed() < Duration::from_secs(5) {
        std::thread::sleep(Duration::from_millis(2));
    }
    let why = setup_err(ShmGroup::join(&g, 1, 3, opts(4096, 500)));
    assert!(why.contains("world of 2"), "{why}");
    let e = r0.join().unwrap().unwrap_err();
    assert!(matches!(e, CommError::Timeout { .. }), "{e}");
    assert!(
        !segment_exists(&g),
        "rank 0 must remove its segment on failure"
    );
}

#[test]
fn missing_rank0_times_out_with_a_clear_error() {
    let g = unique("norank0");
    let t0 = Instant::now();
    let why = setup_err(ShmGroup::join(&g, 1, 2, opts(4096, 300)));
    assert!(why.contains("did not create"), "{why}");
    assert!(t0.elapsed() < Duration::from_millis(1300));
}

#[test]
fn launcher_propagates_failure_status() {
    let out = Command::new(LAUNCH)
        .args([
            "-n",
            "2",
            "--",
            "sh",
            "-c",
            "if [ \"$KFAC_RANK\" = 1 ]; then exit 7; fi; sleep 5",
        ])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(7));
    let out = Command::new(LAUNCH)
        .args([
            "-n",
            "3",
            "--",
            "sh",
            "-c",
            "echo hi $KFAC_RANK/$KFAC_WORLD_SIZE",
        ])
        .output()
        .unwrap();
    assert!(out.status.success());
    let s = String::from_utf8_lossy(&out.stdout);
    for r in 0..3 {
        assert!(s.contains(&format!("[rank {r}] hi {r}/3")), "{s}");
    }
}
