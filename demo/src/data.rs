//! The UCI digits data set, embedded in the binary: decompression, parsing,
//! normalization and a fixed train/test split.
//!
//! The file is the test set of the UCI "Optical Recognition of Handwritten
//! Digits" data set (E. Alpaydin, C. Kaynak, 1998; UCI Machine Learning
//! Repository, CC BY 4.0): 1797 rows of 64 pixel counts (an 8x8 image,
//! integers 0..16) followed by the label 0..9. See `data/README.md`.

use std::fmt;
use std::io::Read;
use std::sync::OnceLock;

use faer::Mat;
use flate2::read::GzDecoder;

use super::rng::SplitMix64;

/// The gzip-compressed CSV, embedded at compile time.
static DIGITS_GZ: &[u8] = include_bytes!("../data/digits.csv.gz");

/// Pixels per image (8x8).
pub const NUM_FEATURES: usize = 64;
/// Number of classes (digits 0..9).
pub const NUM_CLASSES: usize = 10;
/// Number of rows in the embedded file.
pub const NUM_SAMPLES: usize = 1797;
/// Largest pixel value in the raw data (pixels are divided by it).
pub const PIXEL_MAX: f32 = 16.0;
/// Seed of the shuffle that fixes the train/test split. It is deliberately
/// independent of the training seed: every run evaluates on the same images.
pub const SPLIT_SEED: u64 = 0xD161_75D1_6175;

/// Why the embedded data could not be loaded.
#[derive(Debug)]
pub enum DataError {
    /// gzip decompression failed.
    Decompress(std::io::Error),
    /// A line of the CSV is malformed.
    Parse {
        /// 1-based line number.
        line: usize,
        /// What is wrong, in words.
        reason: String,
    },
    /// An argument is out of range.
    InvalidArgument(String),
}

impl fmt::Display for DataError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DataError::Decompress(e) => write!(f, "digits.csv.gz: decompression failed: {e}"),
            DataError::Parse { line, reason } => write!(f, "digits.csv line {line}: {reason}"),
            DataError::InvalidArgument(s) => write!(f, "{s}"),
        }
    }
}

impl std::error::Error for DataError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            DataError::Decompress(e) => Some(e),
            _ => None,
        }
    }
}

/// Images and labels: `x` is `n x 64` (one image per row, pixels in
/// `[0, 1]`), `labels[i]` the digit of row `i`.
#[derive(Clone, Debug)]
pub struct Split {
    /// Pixels, `n x 64`, normalized to `[0, 1]`.
    pub x: Mat<f32>,
    /// Labels `0..10`, one per row of `x`.
    pub labels: Vec<usize>,
}

impl Split {
    /// Number of samples.
    pub fn len(&self) -> usize {
        self.labels.len()
    }

    /// Whether there are no samples.
    pub fn is_empty(&self) -> bool {
        self.labels.is_empty()
    }

    /// The rows `idx` as a new split (a minibatch).
    pub fn gather(&self, idx: &[usize]) -> Split {
        Split {
            x: Mat::from_fn(idx.len(), self.x.ncols(), |i, j| self.x[(idx[i], j)]),
            labels: idx.iter().map(|&i| self.labels[i]).collect(),
        }
    }

    /// The first `n` samples (all of them if `n >= len`).
    pub fn truncate(&self, n: usize) -> Split {
        let n = n.min(self.len());
        let idx: Vec<usize> = (0..n).collect();
        self.gather(&idx)
    }
}

/// The data set split into a training and a held-out test part.
#[derive(Clone, Debug)]
pub struct Digits {
    /// Training samples.
    pub train: Split,
    /// Held-out test samples.
    pub test: Split,
}

/// Decompresses and parses the embedded CSV: `(pixels, labels)` with the
/// pixels of row `i` at `pixels[64 i .. 64 (i + 1)]`, raw values `0..=16`.
///
/// # Errors
/// [`DataError::Decompress`] or [`DataError::Parse`] (wrong number of
/// fields, non-numeric values, out-of-range pixels or labels).
pub fn parse_embedded() -> Result<(Vec<f32>, Vec<usize>), DataError> {
    let mut text = String::new();
    GzDecoder::new(DIGITS_GZ)
        .read_to_string(&mut text)
        .map_err(DataError::Decompress)?;
    parse_csv(&text)
}

/// Parses the digits CSV format (see [`parse_embedded`]); empty lines are
/// skipped.
///
/// # Errors
/// [`DataError::Parse`] naming the first bad line.
///
/// ```
/// let row = format!("{},3", vec!["16"; 64].join(","));
/// let (px, labels) = kfac_demo::data::parse_csv(&row).unwrap();
/// assert_eq!((px.len(), labels), (64, vec![3]));
/// ```
pub fn parse_csv(text: &str) -> Result<(Vec<f32>, Vec<usize>), DataError> {
    let mut pixels = Vec::new();
    let mut labels = Vec::new();
    for (i, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() {
            continue;
        }
        let bad = |reason: String| DataError::Parse {
            line: i + 1,
            reason,
        };
        let fields: Vec<&str> = line.split(',').collect();
        if fields.len() != NUM_FEATURES + 1 {
            return Err(bad(format!(
                "expected {} fields, found {}",
                NUM_FEATURES + 1,
                fields.len()
            )));
        }
        for f in &fields[..NUM_FEATURES] {
            let v: f32 = f
                .trim()
                .parse()
                .map_err(|_| bad(format!("pixel '{f}' is not a number")))?;
            if !(0.0..=PIXEL_MAX).contains(&v) {
                return Err(bad(format!("pixel {v} is outside 0..={PIXEL_MAX}")));
            }
            pixels.push(v);
        }
        let l = fields[NUM_FEATURES].trim();
        let label: usize = l
            .parse()
            .map_err(|_| bad(format!("label '{l}' is not an integer")))?;
        if label >= NUM_CLASSES {
            return Err(bad(format!("label {label} is not a digit")));
        }
        labels.push(label);
    }
    Ok((pixels, labels))
}

fn parsed() -> Result<&'static (Vec<f32>, Vec<usize>), DataError> {
    static CACHE: OnceLock<(Vec<f32>, Vec<usize>)> = OnceLock::new();
    if let Some(c) = CACHE.get() {
        return Ok(c);
    }
    let v = parse_embedded()?;
    Ok(CACHE.get_or_init(|| v))
}

/// The embedded digits, pixels divided by 16, shuffled with the fixed
/// [`SPLIT_SEED`] and split: the last `round(test_fraction * 1797)` samples
/// of the shuffled order are the test set. The parsed file is cached.
///
/// # Errors
/// [`DataError`] if the embedded file cannot be read (it can: it is tested),
/// or [`DataError::InvalidArgument`] unless `0 < test_fraction < 1`.
///
/// ```
/// let d = kfac_demo::data::load_digits(0.2).unwrap();
/// assert_eq!(d.train.len() + d.test.len(), 1797);
/// assert_eq!(d.test.len(), 359);
/// ```
pub fn load_digits(test_fraction: f64) -> Result<Digits, DataError> {
    if !(test_fraction > 0.0 && test_fraction < 1.0) {
        return Err(DataError::InvalidArgument(format!(
            "test_fraction {test_fraction} is not in (0, 1)"
        )));
    }
    let (pixels, labels) = parsed()?;
    let n = labels.len();
    let all = Split {
        x: Mat::from_fn(n, NUM_FEATURES, |i, j| {
            pixels[i * NUM_FEATURES + j] / PIXEL_MAX
        }),
        labels: labels.clone(),
    };
    let mut order: Vec<usize> = (0..n).collect();
    SplitMix64::new(SPLIT_SEED).shuffle(&mut order);
    let n_test = ((n as f64) * test_fraction).round() as usize;
    let n_test = n_test.clamp(1, n - 1);
    let (tr, te) = order.split_at(n - n_test);
    Ok(Digits {
        train: all.gather(tr),
        test: all.gather(te),
    })
}
