//! Fashion-MNIST: the IDX reader, validation, and batches as Burn tensors.

pub mod idx;

use std::path::{Path, PathBuf};

use burn::tensor::module::interpolate;
use burn::tensor::ops::{InterpolateMode, InterpolateOptions};
use burn::tensor::{Device, Int, Tensor, TensorData};
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};

pub use idx::{read_idx, IdxArray, IdxError};

/// Where Debian's `dataset-fashion-mnist` package installs the files.
pub const DEFAULT_DATA_DIR: &str = "/usr/share/datasets/fashion-mnist";

/// The ten classes, in label order (the names d2l prints).
pub const CLASS_NAMES: [&str; 10] = [
    "t-shirt",
    "trouser",
    "pullover",
    "dress",
    "coat",
    "sandal",
    "shirt",
    "sneaker",
    "bag",
    "ankle boot",
];

/// A data problem: the file it concerns, what is wrong, and the fix. (The message holds the
/// file's own error, so none is chained after it.)
#[derive(Debug, thiserror::Error)]
#[error("{problem} ({})", fix(.dir))]
pub struct DataError {
    /// What is wrong.
    pub problem: DataProblem,
    /// The directory the files were looked for in, which decides the fix.
    pub dir: PathBuf,
}

/// What is wrong with the data files.
#[derive(Debug, thiserror::Error)]
pub enum DataProblem {
    /// A file is in neither of its forms (`.gz`, plain); the path named is the `.gz` one.
    #[error("{path}: not found", path = .0.display())]
    Missing(PathBuf),
    /// A file cannot be read or parsed.
    #[error("{0}")]
    Idx(IdxError),
    /// A file parses but is not Fashion-MNIST: not 28 × 28, empty, labels that do not match
    /// the images in number or are not classes 0-9.
    #[error("{path}: {what}", path = .path.display())]
    Invalid {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        what: String,
    },
}

/// Installing the package helps only where it installs; files in a directory the user named
/// are theirs to replace.
fn fix(dir: &Path) -> String {
    match dir == Path::new(DEFAULT_DATA_DIR) {
        true => "install dataset-fashion-mnist or pass --data DIR".to_string(),
        false => format!(
            "put the Fashion-MNIST files in --data {}, or drop --data to read the ones \
             dataset-fashion-mnist installs in {DEFAULT_DATA_DIR}",
            dir.display()
        ),
    }
}

/// One split: `count` grayscale images of `rows × cols` bytes, and their labels.
#[derive(Debug, Clone)]
pub struct Split {
    /// The pixels, `count × rows × cols` bytes (0 black to 255 white), image after image.
    pub images: Vec<u8>,
    /// One class per image, 0-9 (see [`CLASS_NAMES`]).
    pub labels: Vec<u8>,
    /// The image height (28).
    pub rows: usize,
    /// The image width (28).
    pub cols: usize,
}

/// The training and test splits.
#[derive(Debug, Clone)]
pub struct FashionMnist {
    /// The 60,000 training images (`train-*`).
    pub train: Split,
    /// The 10,000 test images (`t10k-*`).
    pub test: Split,
}

impl FashionMnist {
    /// Loads `train-*` and `t10k-*` from `dir`, each `.gz` or plain.
    ///
    /// # Errors
    /// A [`DataError`] naming the file that is missing, unreadable or not Fashion-MNIST.
    pub fn load(dir: &Path) -> Result<Self, DataError> {
        let with_fix = |problem| DataError {
            problem,
            dir: dir.into(),
        };
        Ok(Self {
            train: Split::load(dir, "train").map_err(with_fix)?,
            test: Split::load(dir, "t10k").map_err(with_fix)?,
        })
    }

    /// Loads from [`DEFAULT_DATA_DIR`], where `dataset-fashion-mnist` installs the files.
    ///
    /// # Errors
    /// As [`Self::load`].
    pub fn load_default() -> Result<Self, DataError> {
        Self::load(Path::new(DEFAULT_DATA_DIR))
    }
}

/// `dir/name.gz` if it exists, else `dir/name`; an error names the `.gz` path.
fn find(dir: &Path, name: &str) -> Result<PathBuf, DataProblem> {
    let gz = dir.join(format!("{name}.gz"));
    let plain = dir.join(name);
    match (gz.is_file(), plain.is_file()) {
        (true, _) => Ok(gz),
        (false, true) => Ok(plain),
        (false, false) => Err(DataProblem::Missing(gz)),
    }
}

impl Split {
    /// Loads `prefix-images-idx3-ubyte` and `prefix-labels-idx1-ubyte` from `dir`, each `.gz`
    /// or plain, and checks that they make a Fashion-MNIST split.
    ///
    /// # Errors
    /// A [`DataProblem`] naming the file that is missing, unreadable or not Fashion-MNIST.
    pub fn load(dir: &Path, prefix: &str) -> Result<Self, DataProblem> {
        let image_path = find(dir, &format!("{prefix}-images-idx3-ubyte"))?;
        let label_path = find(dir, &format!("{prefix}-labels-idx1-ubyte"))?;
        let images = read_idx(&image_path, 3).map_err(DataProblem::Idx)?;
        let labels = read_idx(&label_path, 1).map_err(DataProblem::Idx)?;
        let invalid = |path: &Path, what: String| DataProblem::Invalid {
            path: path.into(),
            what,
        };

        let [count, rows, cols] = [images.dims[0], images.dims[1], images.dims[2]];
        if (rows, cols) != (28, 28) {
            return Err(invalid(
                &image_path,
                format!("images are {rows}x{cols}, expected 28x28"),
            ));
        }
        if count == 0 {
            return Err(invalid(&image_path, "holds no images".into()));
        }
        if labels.dims[0] != count {
            return Err(invalid(
                &label_path,
                format!(
                    "{} labels for {count} images in {}",
                    labels.dims[0],
                    image_path.display()
                ),
            ));
        }
        if let Some(pos) = labels
            .values
            .iter()
            .position(|&l| l as usize >= CLASS_NAMES.len())
        {
            return Err(invalid(
                &label_path,
                format!(
                    "label {} at index {pos} is not a class 0-9",
                    labels.values[pos]
                ),
            ));
        }
        Ok(Self {
            images: images.values,
            labels: labels.values,
            rows,
            cols,
        })
    }

    /// The number of examples.
    pub fn len(&self) -> usize {
        self.labels.len()
    }

    /// Whether the split holds no examples.
    pub fn is_empty(&self) -> bool {
        self.labels.is_empty()
    }

    /// The first `n` examples (all of them if `n` is larger): for quick runs and tests.
    pub fn take(&self, n: usize) -> Split {
        let n = n.min(self.len());
        Split {
            images: self.images[..n * self.rows * self.cols].to_vec(),
            labels: self.labels[..n].to_vec(),
            rows: self.rows,
            cols: self.cols,
        }
    }

    /// Images `indices` as an `(n, 1, rows, cols)` tensor scaled to [0, 1], and their labels.
    pub fn batch(&self, indices: &[usize], device: &Device) -> (Tensor<4>, Tensor<1, Int>) {
        self.augmented_batch(indices, Augment::default(), 0, device)
    }

    /// As [`Self::batch`], each image moved and mirrored as `augment` says, at random from a
    /// generator seeded with `seed` (the same seed, the same batch).
    pub fn augmented_batch(
        &self,
        indices: &[usize],
        augment: Augment,
        seed: u64,
        device: &Device,
    ) -> (Tensor<4>, Tensor<1, Int>) {
        let pixels = self.rows * self.cols;
        let mut values = Vec::with_capacity(indices.len() * pixels);
        let mut rng = rand_pcg::Pcg64::seed_from_u64(seed);
        for &i in indices {
            let image = &self.images[i * pixels..(i + 1) * pixels];
            match augment.is_off() {
                true => values.extend(image.iter().map(|&p| p as f32 / 255.0)),
                false => augment.apply(image, (self.rows, self.cols), &mut rng, &mut values),
            }
        }
        let images = Tensor::from_data(
            TensorData::new(values, [indices.len(), 1, self.rows, self.cols]),
            device,
        );
        let labels: Vec<i64> = indices.iter().map(|&i| self.labels[i] as i64).collect();
        let labels = Tensor::from_data(TensorData::new(labels, [indices.len()]), device);
        (images, labels)
    }
}

/// Random changes to training images: a shift (zero padding then a random crop back to the
/// original size) and a left-right mirror.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Augment {
    /// Pad by this many pixels on each side, then crop at a random offset: a shift of up to
    /// `crop` pixels each way, the uncovered border black (0 = off).
    pub crop: usize,
    /// Mirror left to right with probability 1/2.
    pub flip: bool,
}

impl Augment {
    /// Whether it leaves every image as it is.
    pub fn is_off(self) -> bool {
        self.crop == 0 && !self.flip
    }

    /// Appends `image` (`rows × cols` bytes), shifted and mirrored at random, scaled to [0, 1].
    fn apply(
        self,
        image: &[u8],
        (rows, cols): (usize, usize),
        rng: &mut impl Rng,
        out: &mut Vec<f32>,
    ) {
        let pad = self.crop as i64;
        let (dy, dx) = match pad {
            0 => (0, 0),
            _ => (
                rng.random_range(-pad..=pad) as isize,
                rng.random_range(-pad..=pad) as isize,
            ),
        };
        let flip = self.flip && rng.random_bool(0.5);
        for r in 0..rows as isize {
            let sr = r + dy;
            for c in 0..cols as isize {
                let c = if flip { cols as isize - 1 - c } else { c };
                let sc = c + dx;
                let inside = (0..rows as isize).contains(&sr) && (0..cols as isize).contains(&sc);
                out.push(match inside {
                    true => image[sr as usize * cols + sc as usize] as f32 / 255.0,
                    false => 0.0,
                });
            }
        }
    }
}

/// The order in which an epoch visits `n` examples: a permutation drawn from `(seed, epoch)`
/// alone, so that any epoch can be reproduced without replaying the ones before it. With
/// `shuffle` off, file order.
pub fn epoch_order(n: usize, seed: u64, epoch: usize, shuffle: bool) -> Vec<usize> {
    let mut order: Vec<usize> = (0..n).collect();
    if shuffle {
        let stream = seed ^ (epoch as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15);
        let mut rng = rand_pcg::Pcg64::seed_from_u64(stream);
        order.shuffle(&mut rng);
    }
    order
}

/// Splits an order into batches of `batch_size`; the last may be smaller. A last batch of a
/// single example is dropped in training: batch norm cannot train on one value per channel.
pub fn batches(order: &[usize], batch_size: usize, training: bool) -> Vec<&[usize]> {
    let mut chunks: Vec<&[usize]> = order.chunks(batch_size.max(1)).collect();
    if training && chunks.len() > 1 && chunks.last().is_some_and(|c| c.len() == 1) {
        chunks.pop();
    }
    chunks
}

/// Examples `indices` of `split` as model input: `(n, 1, size, size)` after a bilinear resize
/// (half-pixel centres, as PyTorch's `align_corners=False`) when `size` is not 28.
pub fn input_batch(
    split: &Split,
    indices: &[usize],
    size: usize,
    device: &Device,
) -> (Tensor<4>, Tensor<1, Int>) {
    augmented_input_batch(split, indices, size, Augment::default(), 0, device)
}

/// As [`input_batch`], the images changed by `augment` (drawn from `seed`) before the resize.
pub fn augmented_input_batch(
    split: &Split,
    indices: &[usize],
    size: usize,
    augment: Augment,
    seed: u64,
    device: &Device,
) -> (Tensor<4>, Tensor<1, Int>) {
    if size == split.rows {
        return split.augmented_batch(indices, augment, seed, device);
    }
    // Resize on the plain device: nothing of it needs a gradient.
    let inference = crate::device::inference_device();
    let (images, labels) = split.augmented_batch(indices, augment, seed, &inference);
    let options = InterpolateOptions::new(InterpolateMode::Bilinear)
        .with_align_corners(false)
        .with_output_size([size, size]);
    let images = interpolate(images, options);
    (images.to_device(device), labels.to_device(device))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn epoch_order_is_a_reproducible_permutation() {
        let a = epoch_order(1000, 7, 3, true);
        assert_eq!(a, epoch_order(1000, 7, 3, true));
        assert_ne!(a, epoch_order(1000, 7, 4, true));
        assert_ne!(a, epoch_order(1000, 8, 3, true));
        let mut sorted = a.clone();
        sorted.sort();
        assert_eq!(sorted, (0..1000).collect::<Vec<_>>());
        assert_eq!(epoch_order(5, 7, 3, false), vec![0, 1, 2, 3, 4]);
    }

    /// The shift moves pixels by whole places and fills with black; the mirror reverses each
    /// row; both come from the seed alone.
    #[test]
    fn augmentation_shifts_and_mirrors_whole_pixels() {
        let (rows, cols) = (4, 5);
        let image: Vec<u8> = (1..=20).collect();
        let scaled = |v: u8| v as f32 / 255.0;
        let run = |augment: Augment, seed: u64| {
            let mut out = Vec::new();
            let mut rng = rand_pcg::Pcg64::seed_from_u64(seed);
            augment.apply(&image, (rows, cols), &mut rng, &mut out);
            out
        };
        let flip = Augment {
            crop: 0,
            flip: true,
        };
        let (mut mirrored, mut kept) = (0, 0);
        for seed in 0..64 {
            let out = run(flip, seed);
            assert_eq!(out, run(flip, seed), "seed {seed}");
            let straight: Vec<f32> = image.iter().map(|&v| scaled(v)).collect();
            let mirror: Vec<f32> = image
                .chunks(cols)
                .flat_map(|row| row.iter().rev().map(|&v| scaled(v)))
                .collect();
            match (out == mirror, out == straight) {
                (true, false) => mirrored += 1,
                (false, true) => kept += 1,
                _ => panic!("seed {seed}: neither the image nor its mirror"),
            }
        }
        assert!(
            mirrored > 16 && kept > 16,
            "{mirrored} mirrored, {kept} kept"
        );

        let crop = Augment {
            crop: 2,
            flip: false,
        };
        for seed in 0..64 {
            let out = run(crop, seed);
            // Some shift (dy, dx) within ±2 explains every output pixel.
            let explains = |dy: isize, dx: isize| {
                (0..rows as isize).all(|r| {
                    (0..cols as isize).all(|c| {
                        let (sr, sc) = (r + dy, c + dx);
                        let want = match (0..rows as isize).contains(&sr)
                            && (0..cols as isize).contains(&sc)
                        {
                            true => scaled(image[sr as usize * cols + sc as usize]),
                            false => 0.0,
                        };
                        out[r as usize * cols + c as usize] == want
                    })
                })
            };
            let found = (-2..=2).any(|dy| (-2..=2).any(|dx| explains(dy, dx)));
            assert!(found, "seed {seed}: no shift within 2 pixels gives {out:?}");
        }
        assert!(Augment::default().is_off());
    }

    #[test]
    fn a_trailing_single_example_is_dropped_only_in_training() {
        let order: Vec<usize> = (0..9).collect();
        assert_eq!(batches(&order, 4, true).len(), 2);
        assert_eq!(batches(&order, 4, false).len(), 3);
        assert_eq!(batches(&order, 3, true).len(), 3);
    }
}
