//! The training loop: one optimizer, a fixed seed, per-epoch records.

use std::fmt;
use std::time::Instant;

use super::data::{load_digits, DataError, Split, NUM_CLASSES, NUM_FEATURES};
use super::mlp::{accuracy, reconstruction_error, Activation, Loss, Mlp, Targets};
use super::optim::{KfacTimes, OptState, Optimizer};
use super::rng::SplitMix64;

/// What the network learns.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Task {
    /// Digit classification: softmax cross-entropy, test accuracy.
    Classify,
    /// A deep autoencoder of the 64 pixels (Martens & Grosse's benchmark in
    /// miniature): sigmoid cross-entropy, test reconstruction error.
    Autoencoder,
}

impl Task {
    /// The default layer widths: `64-128-64-10` for the classifier,
    /// `64-48-32-16-32-48-64` for the autoencoder.
    pub fn default_sizes(self) -> Vec<usize> {
        match self {
            Task::Classify => vec![NUM_FEATURES, 128, 64, NUM_CLASSES],
            Task::Autoencoder => vec![NUM_FEATURES, 48, 32, 16, 32, 48, NUM_FEATURES],
        }
    }

    /// The loss of the task.
    pub fn loss(self) -> Loss {
        match self {
            Task::Classify => Loss::SoftmaxCrossEntropy,
            Task::Autoencoder => Loss::SigmoidCrossEntropy,
        }
    }

    /// The width the last layer must have.
    pub fn output_width(self) -> usize {
        match self {
            Task::Classify => NUM_CLASSES,
            Task::Autoencoder => NUM_FEATURES,
        }
    }

    fn targets(self, s: &Split) -> Targets<'_> {
        match self {
            Task::Classify => Targets::Labels(&s.labels),
            Task::Autoencoder => Targets::Values(s.x.as_ref()),
        }
    }
}

impl fmt::Display for Task {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Task::Classify => "classify",
            Task::Autoencoder => "autoencoder",
        })
    }
}

impl std::str::FromStr for Task {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "classify" | "classification" => Ok(Task::Classify),
            "autoencoder" | "ae" => Ok(Task::Autoencoder),
            _ => Err(format!("unknown task '{s}' (classify or autoencoder)")),
        }
    }
}

/// Everything that defines a training run.
#[derive(Clone, Debug, PartialEq)]
pub struct TrainConfig {
    /// The task.
    pub task: Task,
    /// The optimizer.
    pub optimizer: Optimizer,
    /// Layer widths, input first (`64` in, `10` or `64` out).
    pub layer_sizes: Vec<usize>,
    /// Hidden-layer nonlinearity.
    pub activation: Activation,
    /// Passes over the training set.
    pub epochs: usize,
    /// Minibatch size (the last batch of an epoch may be smaller).
    pub batch_size: usize,
    /// Seed of the weight initialization, the batch order and K-FAC's
    /// sampled targets (three independent streams: the batches are the same
    /// for every optimizer).
    pub seed: u64,
    /// Train on only the first this many training samples (`None`: all).
    pub train_limit: Option<usize>,
    /// Fraction of the 1797 samples held out for testing (the split itself
    /// is fixed by [`SPLIT_SEED`](super::data::SPLIT_SEED)).
    pub test_fraction: f64,
}

impl TrainConfig {
    /// The default setup of `task` with `optimizer`: default layer sizes,
    /// tanh, 20 epochs, batches of 64, seed 0, all training data, 20% test.
    pub fn new(task: Task, optimizer: Optimizer) -> Self {
        Self {
            task,
            optimizer,
            layer_sizes: task.default_sizes(),
            activation: Activation::Tanh,
            epochs: 20,
            batch_size: 64,
            seed: 0,
            train_limit: None,
            test_fraction: 0.2,
        }
    }

    fn validate(&self) -> Result<(), DemoError> {
        let bad = |s: String| Err(DemoError::Config(s));
        let s = &self.layer_sizes;
        if s.len() < 2 || s.contains(&0) {
            return bad(format!("layer sizes {s:?}: need >= 2 non-zero widths"));
        }
        if s[0] != NUM_FEATURES || s[s.len() - 1] != self.task.output_width() {
            return bad(format!(
                "layer sizes {s:?}: {} needs {NUM_FEATURES} inputs and {} outputs",
                self.task,
                self.task.output_width()
            ));
        }
        if self.batch_size == 0 {
            return bad("batch_size must be >= 1".into());
        }
        if self.train_limit == Some(0) {
            return bad("train_limit must be >= 1".into());
        }
        Ok(())
    }
}

/// The state after one epoch (epoch 0: at initialization).
#[derive(Clone, Debug, PartialEq)]
pub struct EpochRecord {
    /// Epochs completed.
    pub epoch: usize,
    /// Mean of the minibatch losses seen during the epoch (epoch 0: the
    /// loss on the training set at initialization).
    pub train_loss: f64,
    /// Loss on the test set.
    pub test_loss: f64,
    /// Test accuracy in `[0, 1]` (classification only).
    pub test_accuracy: Option<f64>,
    /// Test reconstruction error, mean over images of the summed squared
    /// pixel error (autoencoder only).
    pub test_recon_error: Option<f64>,
    /// Training time so far, seconds (evaluation excluded).
    pub elapsed_secs: f64,
    /// Cumulative K-FAC stage timings (K-FAC runs only).
    pub kfac_times: Option<KfacTimes>,
}

/// A goal a run may reach.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Target {
    /// Test accuracy `>=` this.
    Accuracy(f64),
    /// Test reconstruction error `<=` this.
    ReconError(f64),
}

impl Target {
    /// Whether `r` meets the target.
    pub fn reached(&self, r: &EpochRecord) -> bool {
        match *self {
            Target::Accuracy(t) => r.test_accuracy.is_some_and(|a| a >= t),
            Target::ReconError(t) => r.test_recon_error.is_some_and(|e| e <= t),
        }
    }
}

impl fmt::Display for Target {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Target::Accuracy(t) => write!(f, "test accuracy >= {:.1}%", t * 100.0),
            Target::ReconError(t) => write!(f, "test reconstruction error <= {t}"),
        }
    }
}

/// The outcome of [`train`].
#[derive(Clone, Debug, PartialEq)]
pub struct RunResult {
    /// The configuration that produced it.
    pub config: TrainConfig,
    /// One record per epoch, starting with epoch 0 (initialization).
    pub records: Vec<EpochRecord>,
    /// Whether training stopped early on a non-finite loss.
    pub diverged: bool,
}

impl RunResult {
    /// The first record (epoch >= 1) that meets `target`.
    pub fn first_reaching(&self, target: Target) -> Option<&EpochRecord> {
        self.records.iter().skip(1).find(|r| target.reached(r))
    }

    /// The last record.
    pub fn last(&self) -> &EpochRecord {
        self.records.last().expect("epoch 0 is always recorded")
    }
}

/// Why a run could not be made.
#[derive(Debug)]
pub enum DemoError {
    /// The embedded data.
    Data(DataError),
    /// The K-FAC preconditioner refused something.
    Kfac(kfac_runtime::Error),
    /// The configuration is inconsistent.
    Config(String),
}

impl fmt::Display for DemoError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DemoError::Data(e) => write!(f, "data: {e}"),
            DemoError::Kfac(e) => write!(f, "k-fac: {e}"),
            DemoError::Config(s) => write!(f, "config: {s}"),
        }
    }
}

impl std::error::Error for DemoError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            DemoError::Data(e) => Some(e),
            DemoError::Kfac(e) => Some(e),
            DemoError::Config(_) => None,
        }
    }
}

impl From<DataError> for DemoError {
    fn from(e: DataError) -> Self {
        DemoError::Data(e)
    }
}

impl From<kfac_runtime::Error> for DemoError {
    fn from(e: kfac_runtime::Error) -> Self {
        DemoError::Kfac(e)
    }
}

/// Trains one network with one optimizer (see [`train_with`]).
///
/// # Errors
/// As [`train_with`].
pub fn train(config: &TrainConfig) -> Result<RunResult, DemoError> {
    train_with(config, |_| {})
}

/// Trains one network with one optimizer and calls `on_epoch` after every
/// epoch (for progress reporting).
///
/// The run is deterministic given the configuration: the initial weights,
/// the batch order and K-FAC's sampled targets come from independent
/// streams of `config.seed`, so every optimizer sees the same network and
/// the same minibatches. A non-finite training loss stops the run with
/// `diverged` set.
///
/// # Errors
/// [`DemoError::Config`] for inconsistent sizes, [`DemoError::Data`] if the
/// embedded data cannot be read, [`DemoError::Kfac`] if the preconditioner
/// fails (e.g. a damping too small for the factors).
///
/// ```
/// use kfac_demo::{train, Optimizer, Task, TrainConfig};
/// let mut cfg = TrainConfig::new(Task::Classify, Optimizer::Sgd { lr: 0.1, momentum: 0.9 });
/// cfg.layer_sizes = vec![64, 16, 10];
/// cfg.epochs = 1;
/// cfg.train_limit = Some(128);
/// let r = train(&cfg).unwrap();
/// assert_eq!(r.records.len(), 2);
/// ```
pub fn train_with(
    config: &TrainConfig,
    on_epoch: impl FnMut(&EpochRecord),
) -> Result<RunResult, DemoError> {
    train_impl(config, None, on_epoch)
}

/// [`train_with`] for one rank of a data-parallel K-FAC run: every
/// minibatch is split into `comm.size()` contiguous shards, this rank
/// computes the forward/backward pass and the K-FAC statistics of its shard
/// only, gradients are averaged across ranks, and the preconditioner
/// reduces the factor statistics and shares the decompositions over `comm`.
/// All ranks end with identical weights; the recorded train loss is this
/// rank's shard's. Minibatches smaller than the number of ranks are
/// skipped (on every rank alike).
///
/// # Errors
/// As [`train_with`]; [`DemoError::Kfac`] for a non-K-FAC optimizer or a
/// failed collective (e.g. a dead peer).
pub fn train_distributed(
    config: &TrainConfig,
    comm: Box<dyn kfac_runtime::comm::Communicator>,
    on_epoch: impl FnMut(&EpochRecord),
) -> Result<RunResult, DemoError> {
    train_impl(config, Some(comm), on_epoch)
}

fn train_impl(
    config: &TrainConfig,
    comm: Option<Box<dyn kfac_runtime::comm::Communicator>>,
    mut on_epoch: impl FnMut(&EpochRecord),
) -> Result<RunResult, DemoError> {
    config.validate()?;
    let (rank, world) = comm.as_ref().map_or((0, 1), |c| (c.rank(), c.size()));
    let data = load_digits(config.test_fraction)?;
    let train = match config.train_limit {
        Some(k) => data.train.truncate(k),
        None => data.train,
    };
    let test = data.test;
    let task = config.task;
    let loss = task.loss();

    let mut mlp = Mlp::new(
        &config.layer_sizes,
        config.activation,
        &mut SplitMix64::stream(config.seed, 1),
    );
    let mut batch_rng = SplitMix64::stream(config.seed, 2);
    let mut state = OptState::new(&config.optimizer, &mlp, config.seed, comm)?;

    let init_train_loss = loss
        .loss_and_grad(
            mlp.forward(train.x.as_ref()).output.as_ref(),
            task.targets(&train),
        )
        .0;
    let mut records = vec![evaluate(&mlp, task, &test, 0, init_train_loss, 0.0, &state)];
    let mut order: Vec<usize> = (0..train.len()).collect();
    let mut elapsed = 0f64;
    let mut diverged = false;
    for epoch in 1..=config.epochs {
        batch_rng.shuffle(&mut order);
        let t0 = Instant::now();
        let (mut loss_sum, mut seen) = (0f64, 0usize);
        for full in order.chunks(config.batch_size) {
            if full.len() < world {
                continue;
            }
            let idx = &full[rank * full.len() / world..(rank + 1) * full.len() / world];
            let batch = train.gather(idx);
            let cache = mlp.forward(batch.x.as_ref());
            let (l, top) = loss.loss_and_grad(cache.output.as_ref(), task.targets(&batch));
            if !l.is_finite() {
                diverged = true;
                break;
            }
            loss_sum += l * idx.len() as f64;
            seen += idx.len();
            let out_grads = mlp.backward(&cache, top);
            let mut grads = mlp.gradients(&cache, &out_grads);
            if world > 1 {
                // average over ranks of (n_r P / N) g_r = Σ n_r g_r / N
                let s = (idx.len() * world) as f32 / full.len() as f32;
                for g in &mut grads {
                    g.weight
                        .iter_mut()
                        .chain(g.bias.iter_mut())
                        .for_each(|v| *v *= s);
                }
            }
            state.update(&mut mlp, loss, &cache, &out_grads, &mut grads)?;
        }
        elapsed += t0.elapsed().as_secs_f64();
        if diverged {
            break;
        }
        let r = evaluate(
            &mlp,
            task,
            &test,
            epoch,
            loss_sum / seen as f64,
            elapsed,
            &state,
        );
        on_epoch(&r);
        records.push(r);
    }
    Ok(RunResult {
        config: config.clone(),
        records,
        diverged,
    })
}

fn evaluate(
    mlp: &Mlp,
    task: Task,
    test: &Split,
    epoch: usize,
    train_loss: f64,
    elapsed_secs: f64,
    state: &OptState,
) -> EpochRecord {
    let out = mlp.forward(test.x.as_ref()).output;
    let (test_loss, _) = task.loss().loss_and_grad(out.as_ref(), task.targets(test));
    let (test_accuracy, test_recon_error) = match task {
        Task::Classify => (Some(accuracy(out.as_ref(), &test.labels)), None),
        Task::Autoencoder => (
            None,
            Some(reconstruction_error(out.as_ref(), test.x.as_ref())),
        ),
    };
    EpochRecord {
        epoch,
        train_loss,
        test_loss,
        test_accuracy,
        test_recon_error,
        elapsed_secs,
        kfac_times: state.kfac_times(),
    }
}
