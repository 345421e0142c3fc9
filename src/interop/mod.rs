//! Talking to other frameworks: PyTorch state_dicts ([`state_dict`] reads their files,
//! [`torch`] matches them to models and writes them), and bnlab's predictions as
//! NumPy files so that another framework's can be compared with them ([`predict`], [`npy`]).

pub mod npy;
pub mod state_dict;
pub mod torch;

use crate::data::{batches, input_batch, Split};
use crate::device::inference_device;
use crate::models::Model;

/// An eval-mode model's outputs on a split.
#[derive(Debug, Clone, PartialEq)]
pub struct Predictions {
    /// Row-major `(n, 10)`.
    pub logits: Vec<f32>,
    /// The argmax of each row (the first on ties, as PyTorch's `argmax`).
    pub labels: Vec<u8>,
}

impl Predictions {
    /// How many examples were predicted (`n`).
    pub fn len(&self) -> usize {
        self.labels.len()
    }

    /// Whether no example was predicted.
    pub fn is_empty(&self) -> bool {
        self.labels.is_empty()
    }

    /// How many predictions match `truth`.
    pub fn correct(&self, truth: &[u8]) -> usize {
        self.labels
            .iter()
            .zip(truth)
            .filter(|(p, t)| p == t)
            .count()
    }
}

/// The logits and predicted classes of `model` on the first `limit` examples of `split` (all
/// if `None`), on images resized to `size`, computed on the evaluation device.
pub fn predict(
    model: &Model,
    split: &Split,
    size: usize,
    batch_size: usize,
    limit: Option<usize>,
) -> Predictions {
    let n = limit.map_or(split.len(), |l| l.min(split.len()));
    let order: Vec<usize> = (0..n).collect();
    let device = inference_device();
    let mut logits = Vec::with_capacity(n * 10);
    for indices in batches(&order, batch_size, false) {
        let (images, _) = input_batch(split, indices, size, &device);
        logits.extend(model.forward(images).into_data().iter::<f32>());
    }
    let labels = logits.chunks_exact(10).map(argmax).collect();
    Predictions { logits, labels }
}

fn argmax(row: &[f32]) -> u8 {
    let mut best = 0;
    for (i, &v) in row.iter().enumerate() {
        // `>` keeps the first of equal values, as PyTorch does.
        if v > row[best] {
            best = i;
        }
    }
    best as u8
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn argmax_takes_the_first_largest() {
        assert_eq!(argmax(&[0.0, 2.0, 2.0, 1.0]), 1);
        assert_eq!(argmax(&[3.0, -1.0]), 0);
        assert_eq!(argmax(&[-5.0, -1.0, -3.0]), 1);
    }
}
