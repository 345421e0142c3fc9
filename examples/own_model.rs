//! bnlab's `BatchNorm` in a CNN of your own, next to Burn's own modules.
//!
//! `Conv(1→8, 3×3) → BatchNorm → ReLU → MaxPool 2 → Conv(8→16, 3×3) → BatchNorm → ReLU →
//! MaxPool 2 → Linear(784→10)`, trained with Burn's Adam for a few batches of Fashion-MNIST and
//! then evaluated in eval mode (`model.valid()`: the running statistics replace the batch ones).
//! `Kernel::Fused` runs bnlab's hand-written training kernel on Flex; the rest is plain Burn.
//!
//! ```text
//! cargo run --release --example own_model -- [--batches 200] [--data DIR]
//! ```
//!
//! Prints the mean training loss of the last batches and the accuracy on the 10,000 test images.

use std::path::PathBuf;

use bnlab::data::{batches, epoch_order, input_batch, FashionMnist, DEFAULT_DATA_DIR};
use bnlab::norm::{BatchNorm, BatchNormConfig, Kernel};
use bnlab::train::{eval_device, train_device};
use burn::module::Module;
use burn::nn::conv::{Conv2d, Conv2dConfig};
use burn::nn::loss::CrossEntropyLossConfig;
use burn::nn::pool::{MaxPool2d, MaxPool2dConfig};
use burn::nn::{Linear, LinearConfig, PaddingConfig2d};
use burn::optim::{AdamConfig, GradientsParams};
use burn::tensor::activation::relu;
use burn::tensor::{Device, Int, Tensor};

/// The user's model: Burn layers, with bnlab's `BatchNorm` where `burn::nn::BatchNorm` would go.
#[derive(Module, Debug)]
struct SmallCnn {
    conv1: Conv2d,
    bn1: BatchNorm,
    conv2: Conv2d,
    bn2: BatchNorm,
    pool: MaxPool2d,
    fc: Linear,
}

impl SmallCnn {
    fn new(device: &Device) -> Self {
        let conv = |cin, cout| {
            Conv2dConfig::new([cin, cout], [3, 3])
                .with_padding(PaddingConfig2d::Explicit(1, 1, 1, 1))
                .init(device)
        };
        // PyTorch's defaults (eps 1e-5, momentum 0.1, unbiased running variance); `Fused`
        // trains with bnlab's Flex kernel, `Composed` with Burn tensor ops on any backend.
        let bn = |c| {
            BatchNormConfig::new(c)
                .with_kernel(Kernel::Fused)
                .init(device)
        };
        Self {
            conv1: conv(1, 8),
            bn1: bn(8),
            conv2: conv(8, 16),
            bn2: bn(16),
            pool: MaxPool2dConfig::new([2, 2]).init(),
            fc: LinearConfig::new(16 * 7 * 7, 10).init(device),
        }
    }

    /// `(N, 1, 28, 28)` images to `(N, 10)` logits.
    fn forward(&self, x: Tensor<4>) -> Tensor<2> {
        let x = self
            .pool
            .forward(relu(self.bn1.forward(self.conv1.forward(x))));
        let x = self
            .pool
            .forward(relu(self.bn2.forward(self.conv2.forward(x))));
        self.fc.forward(x.flatten(1, 3))
    }
}

/// How many of `logits`' rows pick the right label.
fn correct(logits: Tensor<2>, labels: Tensor<1, Int>) -> usize {
    let n = labels.dims()[0];
    let predicted: Tensor<1, Int> = logits.argmax(1).reshape([n]);
    predicted.equal(labels).int().sum().into_scalar::<i64>() as usize
}

fn main() -> std::process::ExitCode {
    match run() {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("own_model: error: {e}");
            std::process::ExitCode::FAILURE
        }
    }
}

fn run() -> Result<(), Box<dyn std::error::Error>> {
    const USAGE: &str = "usage: own_model [--batches N] [--data DIR]";
    let (mut steps, mut dir) = (200usize, PathBuf::from(DEFAULT_DATA_DIR));
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        let mut value = || args.next().ok_or(format!("{arg} needs a value ({USAGE})"));
        match arg.as_str() {
            "--batches" => {
                let n = value()?;
                steps = n
                    .parse()
                    .map_err(|_| format!("--batches '{n}': not a whole number"))?
            }
            "--data" => dir = value()?.into(),
            "-h" | "--help" => {
                println!("{USAGE}");
                return Ok(());
            }
            _ => return Err(format!("unknown argument '{arg}' ({USAGE})").into()),
        }
    }
    let data = FashionMnist::load(&dir)?;

    // Training: an autodiff device, so BatchNorm uses batch statistics and updates its running
    // ones. Burn's initialisers draw from the device's generator; a seed makes runs repeatable.
    let device = train_device();
    device.seed(1);
    let mut model = SmallCnn::new(&device);
    let mut optim = AdamConfig::new().init();
    let loss_fn = CrossEntropyLossConfig::new().init(&device);
    let batch_size = 64;
    let per_epoch = data.train.len() / batch_size;
    let mut order = Vec::new();
    let (mut loss_sum, mut loss_count) = (0.0, 0);
    for step in 0..steps {
        // A new shuffle of the training set every epoch (reproducible from the seed and epoch).
        let (epoch, i) = (step / per_epoch, step % per_epoch);
        if i == 0 {
            order = epoch_order(data.train.len(), 1, epoch, true);
        }
        let indices = &order[i * batch_size..(i + 1) * batch_size];
        let (images, labels) = input_batch(&data.train, indices, 28, &device);
        let loss = loss_fn.forward(model.forward(images), labels);
        // The printed loss is the mean of the last 20 batches'.
        if step + 20 >= steps {
            loss_sum += loss.clone().into_scalar::<f32>() as f64;
            loss_count += 1;
        }
        let grads = GradientsParams::from_grads(loss.backward(), &model);
        model = optim.step(1e-3, model, grads);
    }

    // Eval mode: `valid()` leaves autodiff and turns the training flags off, so BatchNorm
    // normalises with its running statistics.
    let model = model.valid();
    let device = eval_device();
    let order: Vec<usize> = (0..data.test.len()).collect();
    let mut right = 0;
    for indices in batches(&order, 500, false) {
        let (images, labels) = input_batch(&data.test, indices, 28, &device);
        right += correct(model.forward(images), labels);
    }
    let accuracy = right as f64 / data.test.len() as f64;
    println!("batches {steps} (of {batch_size})");
    if loss_count > 0 {
        println!("train loss {:.4}", loss_sum / loss_count as f64);
    }
    println!("test accuracy {accuracy:.4}");
    Ok(())
}
