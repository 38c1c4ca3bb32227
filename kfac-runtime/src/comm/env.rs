//! Rank, world size and group name from the environment.
//!
//! Our launcher sets `KFAC_RANK`, `KFAC_WORLD_SIZE` and `KFAC_GROUP`. When
//! those are absent the usual variables are read: `RANK` / `WORLD_SIZE`
//! (torchrun), Open MPI's `OMPI_COMM_WORLD_RANK` / `OMPI_COMM_WORLD_SIZE`,
//! and MPICH/Hydra's `PMI_RANK` / `PMI_SIZE`.
//!
//! ```
//! use kfac_runtime::comm::env::from_vars;
//! let vars = [("RANK", "1"), ("WORLD_SIZE", "4"), ("KFAC_GROUP", "job7")];
//! let e = from_vars(|k| vars.iter().find(|(n, _)| *n == k).map(|(_, v)| v.to_string())).unwrap();
//! assert_eq!((e.rank, e.world_size, e.group.as_str()), (1, 4, "job7"));
//! ```

use super::CommError;

/// Where this process sits in its job.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct JobEnv {
    /// This process's rank.
    pub rank: usize,
    /// Number of processes.
    pub world_size: usize,
    /// Group name (unique per job).
    pub group: String,
}

const RANK_VARS: [(&str, &str); 4] = [
    ("KFAC_RANK", "KFAC_WORLD_SIZE"),
    ("RANK", "WORLD_SIZE"),
    ("OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE"),
    ("PMI_RANK", "PMI_SIZE"),
];

/// Reads the job environment through `get` (for tests); see the module docs.
///
/// # Errors
/// [`CommError::Setup`] when no rank variables are set, a value does not
/// parse, the rank is not below the world size, or `KFAC_GROUP` is missing
/// (a group name cannot be guessed safely).
pub fn from_vars(get: impl Fn(&str) -> Option<String>) -> Result<JobEnv, CommError> {
    let setup = |reason: String| CommError::Setup { reason };
    let parse = |name: &str, v: String| {
        v.trim()
            .parse::<usize>()
            .map_err(|_| setup(format!("{name}={v:?} is not a non-negative integer")))
    };
    for (rv, sv) in RANK_VARS {
        if let (Some(r), Some(s)) = (get(rv), get(sv)) {
            let rank = parse(rv, r)?;
            let world_size = parse(sv, s)?;
            if world_size == 0 || rank >= world_size {
                return Err(setup(format!("{rv}={rank} is not below {sv}={world_size}")));
            }
            let group = get("KFAC_GROUP")
                .filter(|g| !g.is_empty())
                .ok_or_else(|| setup("KFAC_GROUP is not set (kfac-launch sets it)".into()))?;
            return Ok(JobEnv {
                rank,
                world_size,
                group,
            });
        }
    }
    Err(setup(
        "no rank variables set (KFAC_RANK/KFAC_WORLD_SIZE, RANK/WORLD_SIZE, OMPI_COMM_WORLD_*, PMI_*)".into(),
    ))
}

/// Reads the job environment of this process.
///
/// # Errors
/// As [`from_vars`].
pub fn from_env() -> Result<JobEnv, CommError> {
    from_vars(|k| std::env::var(k).ok())
}
