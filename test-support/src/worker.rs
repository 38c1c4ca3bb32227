//! Tests that run their own test binary again as worker processes (ranks
//! of a group, a process to kill): the worker is an `#[ignore]`d test
//! (`#[ignore = "worker entry: run by its parent test"]`), so a normal
//! run never reports it as passed without doing anything, and the parent
//! starts it with `--ignored --exact` ([`args`]) and checks with
//! [`assert_ran`] that each worker really ran it to the end: libtest's
//! "1 passed" and the marker printed by [`done`].

/// Arguments that make a test binary run exactly the ignored test `name`
/// on one thread with its output shown.
pub fn args(name: &str) -> [&str; 6] {
    [
        name,
        "--exact",
        "--ignored",
        "--nocapture",
        "--test-threads",
        "1",
    ]
}

/// The role a parent gave this worker in `var`. Panics when it is unset:
/// the worker test was run by hand or by `--ignored`, not by its parent.
pub fn role(var: &str) -> String {
    std::env::var(var).unwrap_or_else(|_| {
        panic!("worker entry: run by its parent test (which sets {var}), not on its own")
    })
}

/// Prints the marker [`assert_ran`] looks for: call it as the worker's
/// last statement.
pub fn done(role: &str) {
    println!("kfac-test-worker {role} done");
}

/// Panics unless `stdout` (of one worker, or of `count` workers under
/// `kfac-launch`) shows `count` workers that printed [`done`] for `role`
/// and whose test binary reported exactly one test passed.
pub fn assert_ran(stdout: &str, role: &str, count: usize) {
    let marker = format!("kfac-test-worker {role} done");
    let done = stdout.lines().filter(|l| l.ends_with(&marker)).count();
    let passed = stdout
        .lines()
        .filter(|l| l.contains("test result: ok. 1 passed;"))
        .count();
    assert!(
        done == count && passed == count,
        "expected {count} worker(s) {role} to run and pass, saw {done} marker(s) and {passed} \
         passing run(s):\n{stdout}"
    );
}

#[cfg(test)]
mod tests {
    use super::assert_ran;

    const RAN: &str = "running 1 test\ntest worker_entry ... kfac-test-worker dist done\nok\n\n\
                       test result: ok. 1 passed; 0 failed; 0 ignored; 0 measured; 3 filtered out\n";

    #[test]
    fn a_worker_that_ran_and_passed_is_accepted() {
        assert_ran(RAN, "dist", 1);
        let two = format!("[rank 0] {}", RAN.replace('\n', "\n[rank 0] "))
            + &format!("[rank 1] {}", RAN.replace('\n', "\n[rank 1] "));
        assert_ran(&two, "dist", 2);
    }

    #[test]
    #[should_panic(expected = "expected 1 worker")]
    fn a_filtered_out_worker_is_refused() {
        assert_ran(
            "running 0 tests\n\ntest result: ok. 0 passed; 0 failed; 1 ignored\n",
            "dist",
            1,
        );
    }

    #[test]
    #[should_panic(expected = "expected 1 worker")]
    fn a_worker_that_returned_early_is_refused() {
        assert_ran(
            "running 1 test\ntest worker_entry ... ok\n\ntest result: ok. 1 passed; 0 failed\n",
            "dist",
            1,
        );
    }
}
