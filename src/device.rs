//! Which backend runs the tensors: `--device flex|wgpu|cuda|libtorch[:N]`.
//!
//! Flex (pure-Rust CPU) is always built. The others are Cargo features (`wgpu`, `cuda`,
//! `libtorch`) because each pulls a large toolchain; asking for one that this binary was not
//! built with is a one-line error that says how to get it.

use std::str::FromStr;
use std::sync::OnceLock;

use burn::tensor::Device;

/// A Burn backend bnlab can run on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    /// Burn's pure-Rust CPU backend: always built.
    Flex,
    /// Vulkan, Metal or DX12 through wgpu (Cargo feature `wgpu`).
    Wgpu,
    /// NVIDIA GPUs (Cargo feature `cuda`).
    Cuda,
    /// PyTorch's C++ library (Cargo feature `libtorch`): the CPU, or a CUDA GPU.
    Libtorch,
}

/// A backend and, for GPUs, which one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DeviceChoice {
    /// Which backend.
    pub backend: Backend,
    /// Which GPU of it (0 for Flex); for LibTorch 0 is the CPU and `N` the GPU `N - 1`.
    pub index: usize,
}

impl Default for DeviceChoice {
    fn default() -> Self {
        Self {
            backend: Backend::Flex,
            index: 0,
        }
    }
}

impl FromStr for DeviceChoice {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let (name, index) = match s.split_once(':') {
            Some((name, index)) => {
                let index = index
                    .parse()
                    .map_err(|_| format!("'{index}' is not a device number"))?;
                (name, index)
            }
            None => (s, 0),
        };
        let backend = match name {
            "flex" => Backend::Flex,
            "wgpu" => Backend::Wgpu,
            "cuda" => Backend::Cuda,
            "libtorch" => Backend::Libtorch,
            other => {
                return Err(format!(
                    "unknown device '{other}' (choose flex, wgpu, cuda or libtorch[:N])"
                ));
            }
        };
        if backend == Backend::Flex && index != 0 {
            return Err("flex is the CPU: it takes no device number".into());
        }
        Ok(Self { backend, index })
    }
}

impl std::fmt::Display for DeviceChoice {
    fn fmt(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        let name = match self.backend {
            Backend::Flex => "flex",
            Backend::Wgpu => "wgpu",
            Backend::Cuda => "cuda",
            Backend::Libtorch => "libtorch",
        };
        match self.backend {
            Backend::Flex => write!(f, "{name}"),
            _ => write!(f, "{name}:{}", self.index),
        }
    }
}

/// The backend's device, or why it cannot be had.
pub fn device_for(choice: DeviceChoice) -> Result<Device, String> {
    let missing = |feature: &str, how: &str| {
        Err(format!(
            "--device {choice}: this bnlab was built without {feature} support (rebuild with \
             `cargo build --release --features {feature}`{how})"
        ))
    };
    match choice.backend {
        Backend::Flex => Ok(Device::flex()),
        #[cfg(feature = "wgpu")]
        Backend::Wgpu => Ok(Device::wgpu(burn::tensor::DeviceKind::DefaultDevice)),
        #[cfg(not(feature = "wgpu"))]
        Backend::Wgpu => missing("wgpu", "; it needs a Vulkan, Metal or DX12 driver"),
        #[cfg(feature = "cuda")]
        Backend::Cuda => Ok(Device::cuda(choice.index)),
        #[cfg(not(feature = "cuda"))]
        Backend::Cuda => missing(
            "cuda",
            "; it needs the CUDA toolkit, an NVIDIA GPU, and internet access while it builds: \
             Burn's CUDA backend downloads an LLVM bundle in its build script",
        ),
        #[cfg(feature = "libtorch")]
        Backend::Libtorch => Ok(match choice.index {
            0 => Device::libtorch(),
            n => Device::libtorch_cuda(n - 1),
        }),
        #[cfg(not(feature = "libtorch"))]
        Backend::Libtorch => missing(
            "libtorch",
            " and LIBTORCH_USE_PYTORCH=1 in a Python environment with torch==2.9.0; run it with \
             LD_LIBRARY_PATH pointing at that torch's lib directory",
        ),
    }
}

/// Runs one tiny op on `device`: a GPU backend that finds no adapter (or no driver) panics on
/// first use, which becomes a one-line error here instead of a backtrace mid-run.
fn probe(choice: DeviceChoice, device: &Device) -> Result<(), String> {
    let quiet = std::panic::take_hook();
    std::panic::set_hook(Box::new(|_| {}));
    let result = std::panic::catch_unwind(|| {
        burn::tensor::Tensor::<1>::from_floats([1.0, 2.0], device)
            .sum()
            .into_scalar::<f32>()
    });
    std::panic::set_hook(quiet);
    let fix = match choice.backend {
        Backend::Wgpu => {
            "install a Vulkan driver: on Debian 12 without a GPU, `apt-get install -t \
             bookworm-backports mesa-vulkan-drivers libvulkan1` (lavapipe; stock Mesa 22 computes \
             some gradients wrongly)"
        }
        Backend::Cuda => "check the NVIDIA driver and CUDA toolkit (nvidia-smi)",
        Backend::Libtorch => "check that torch==2.9.0 is installed and LIBTORCH_USE_PYTORCH=1",
        Backend::Flex => "",
    };
    match result {
        Ok(3.0) => Ok(()),
        Ok(v) => Err(format!(
            "--device {choice}: the device computed 1 + 2 = {v}; its driver is broken ({fix})"
        )),
        Err(_) => Err(format!(
            "--device {choice}: no usable device found ({fix}), or use --device flex"
        )),
    }
}

static SELECTED: OnceLock<DeviceChoice> = OnceLock::new();

/// Chooses the backend for this process (once, before any tensor is made).
pub fn select(choice: DeviceChoice) -> Result<(), String> {
    let device = device_for(choice)?;
    if choice.backend != Backend::Flex {
        probe(choice, &device)?;
    }
    match SELECTED.set(choice) {
        Ok(()) => Ok(()),
        Err(_) if SELECTED.get() == Some(&choice) => Ok(()),
        Err(_) => Err(format!("--device {choice}: the device was already chosen")),
    }
}

/// The chosen backend (Flex unless [`select`] said otherwise).
pub fn selected() -> DeviceChoice {
    SELECTED.get().copied().unwrap_or_default()
}

/// The device for inference and data: the chosen backend without autodiff.
pub fn inference_device() -> Device {
    device_for(selected()).expect("select() checked the device")
}

/// The device for training: the chosen backend with autodiff.
pub fn training_device() -> Device {
    inference_device().autodiff()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_device_names() {
        assert_eq!(
            "flex".parse::<DeviceChoice>().unwrap(),
            DeviceChoice::default()
        );
        let cuda: DeviceChoice = "cuda:1".parse().unwrap();
        assert_eq!((cuda.backend, cuda.index), (Backend::Cuda, 1));
        assert_eq!(cuda.to_string(), "cuda:1");
        assert!("tpu"
            .parse::<DeviceChoice>()
            .unwrap_err()
            .contains("unknown device 'tpu'"));
        assert!("cuda:x".parse::<DeviceChoice>().is_err());
        assert!("flex:1".parse::<DeviceChoice>().is_err());
    }

    #[cfg(not(feature = "wgpu"))]
    #[test]
    fn a_backend_not_built_in_says_how_to_get_it() {
        let err = device_for("wgpu".parse().unwrap()).unwrap_err();
        assert!(err.contains("--features wgpu"), "{err}");
    }
}
