//! One tensor type for both backends: a contiguous row-major buffer of f32, bf16 or i32,
//! on the CPU (a `Vec`) or on a CUDA device (a pooled device allocation).
//!
//! Ops never see strides: every layout the engine needs (tokens x features, tokens x heads x
//! head_dim) is contiguous, which keeps the kernels simple and their loads wide.

use std::sync::Arc;

use half::bf16;

use crate::cuda::{DeviceBuffer, Gpu};
use crate::error::{KernelError, Result};

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, serde::Serialize)]
pub enum DType {
    F32,
    BF16,
    I32,
}

impl DType {
    pub fn size_in_bytes(self) -> usize {
        match self {
            DType::F32 | DType::I32 => 4,
            DType::BF16 => 2,
        }
    }
    /// The suffix of the CUDA entry points instantiated for this dtype.
    pub fn kernel_suffix(self) -> &'static str {
        match self {
            DType::F32 => "f32",
            DType::BF16 => "bf16",
            DType::I32 => "i32",
        }
    }
}

impl std::fmt::Display for DType {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            DType::F32 => "f32",
            DType::BF16 => "bf16",
            DType::I32 => "i32",
        })
    }
}

/// Where a tensor lives.
#[derive(Clone)]
pub enum Device {
    Cpu,
    Cuda(Arc<Gpu>),
}

impl Device {
    pub fn is_cuda(&self) -> bool {
        matches!(self, Device::Cuda(_))
    }
    pub fn name(&self) -> String {
        match self {
            Device::Cpu => "cpu".into(),
            Device::Cuda(g) => format!("cuda:{} ({})", g.ordinal(), g.name()),
        }
    }
}

impl std::fmt::Debug for Device {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.name())
    }
}

pub enum CpuData {
    F32(Vec<f32>),
    BF16(Vec<bf16>),
    I32(Vec<i32>),
}

pub enum Storage {
    Cpu(CpuData),
    Cuda(DeviceBuffer),
}

pub struct Tensor {
    shape: Vec<usize>,
    dtype: DType,
    storage: Storage,
}

impl std::fmt::Debug for Tensor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "Tensor({:?}, {}, {:?})",
            self.shape,
            self.dtype,
            self.device()
        )
    }
}

fn count(shape: &[usize]) -> usize {
    shape.iter().product()
}

impl Tensor {
    fn check_len(shape: &[usize], len: usize) -> Result<()> {
        if count(shape) != len {
            return Err(KernelError::shape(
                "tensor",
                format!(
                    "shape {shape:?} holds {} elements, data has {len}",
                    count(shape)
                ),
            ));
        }
        Ok(())
    }

    pub fn from_f32(shape: &[usize], data: Vec<f32>) -> Result<Tensor> {
        Self::check_len(shape, data.len())?;
        Ok(Tensor {
            shape: shape.to_vec(),
            dtype: DType::F32,
            storage: Storage::Cpu(CpuData::F32(data)),
        })
    }

    pub fn from_bf16(shape: &[usize], data: Vec<bf16>) -> Result<Tensor> {
        Self::check_len(shape, data.len())?;
        Ok(Tensor {
            shape: shape.to_vec(),
            dtype: DType::BF16,
            storage: Storage::Cpu(CpuData::BF16(data)),
        })
    }

    pub fn from_i32(shape: &[usize], data: Vec<i32>) -> Result<Tensor> {
        Self::check_len(shape, data.len())?;
        Ok(Tensor {
            shape: shape.to_vec(),
            dtype: DType::I32,
            storage: Storage::Cpu(CpuData::I32(data)),
        })
    }

    /// A CPU tensor of `dtype` from f32 values, rounded to nearest-even when `dtype` is bf16.
    /// This is where the CPU references round, exactly where the CUDA kernels store.
    pub fn from_f32_as(shape: &[usize], data: Vec<f32>, dtype: DType) -> Result<Tensor> {
        match dtype {
            DType::F32 => Self::from_f32(shape, data),
            DType::BF16 => Self::from_bf16(shape, data.into_iter().map(bf16::from_f32).collect()),
            DType::I32 => Err(KernelError::invalid(
                "tensor",
                "cannot build an i32 tensor from f32 values",
            )),
        }
    }

    /// A zero-filled tensor on `device`.
    pub fn zeros(shape: &[usize], dtype: DType, device: &Device) -> Result<Tensor> {
        let n = count(shape);
        match device {
            Device::Cpu => Ok(Tensor {
                shape: shape.to_vec(),
                dtype,
                storage: Storage::Cpu(match dtype {
                    DType::F32 => CpuData::F32(vec![0.0; n]),
                    DType::BF16 => CpuData::BF16(vec![bf16::ZERO; n]),
                    DType::I32 => CpuData::I32(vec![0; n]),
                }),
            }),
            Device::Cuda(gpu) => {
                let buf = gpu.alloc(n * dtype.size_in_bytes())?;
                gpu.memset_zero(&buf)?;
                Ok(Tensor {
                    shape: shape.to_vec(),
                    dtype,
                    storage: Storage::Cuda(buf),
                })
            }
        }
    }

    /// A device tensor whose contents are undefined (poisoned with NaN when the GPU is in
    /// checking mode). Kernels that write every element allocate their outputs this way.
    pub fn uninit_cuda(gpu: &Arc<Gpu>, shape: &[usize], dtype: DType) -> Result<Tensor> {
        let buf = gpu.alloc(count(shape) * dtype.size_in_bytes())?;
        Ok(Tensor {
            shape: shape.to_vec(),
            dtype,
            storage: Storage::Cuda(buf),
        })
    }

    pub fn shape(&self) -> &[usize] {
        &self.shape
    }
    pub fn dtype(&self) -> DType {
        self.dtype
    }
    pub fn elem_count(&self) -> usize {
        count(&self.shape)
    }
    pub fn size_in_bytes(&self) -> usize {
        self.elem_count() * self.dtype.size_in_bytes()
    }
    pub fn storage(&self) -> &Storage {
        &self.storage
    }
    pub fn storage_mut(&mut self) -> &mut Storage {
        &mut self.storage
    }

    pub fn device(&self) -> Device {
        match &self.storage {
            Storage::Cpu(_) => Device::Cpu,
            Storage::Cuda(b) => Device::Cuda(b.gpu().clone()),
        }
    }

    pub fn is_cuda(&self) -> bool {
        matches!(self.storage, Storage::Cuda(_))
    }

    /// The shape as (rows, last dim): every leading dim folded into rows.
    pub fn rows_cols(&self) -> (usize, usize) {
        let cols = self.shape.last().copied().unwrap_or(1);
        let rows = self.elem_count().checked_div(cols).unwrap_or(0);
        (rows, cols)
    }

    /// The same data seen with another shape of the same element count.
    pub fn reshape(self, shape: &[usize]) -> Result<Tensor> {
        if count(shape) != self.elem_count() {
            return Err(KernelError::shape(
                "reshape",
                format!("cannot view {:?} as {:?}", self.shape, shape),
            ));
        }
        Ok(Tensor {
            shape: shape.to_vec(),
            ..self
        })
    }

    /// Copy to `device` (a no-op clone when it is already there).
    pub fn to_device(&self, device: &Device) -> Result<Tensor> {
        match (&self.storage, device) {
            (Storage::Cpu(data), Device::Cuda(gpu)) => {
                let buf = gpu.alloc(self.size_in_bytes())?;
                match data {
                    CpuData::F32(v) => gpu.upload(&buf, v)?,
                    CpuData::BF16(v) => gpu.upload(&buf, v)?,
                    CpuData::I32(v) => gpu.upload(&buf, v)?,
                }
                Ok(Tensor {
                    shape: self.shape.clone(),
                    dtype: self.dtype,
                    storage: Storage::Cuda(buf),
                })
            }
            (Storage::Cuda(buf), Device::Cpu) => {
                let n = self.elem_count();
                let gpu = buf.gpu();
                let data = match self.dtype {
                    DType::F32 => CpuData::F32(gpu.download(buf, n)?),
                    DType::BF16 => CpuData::BF16(gpu.download(buf, n)?),
                    DType::I32 => CpuData::I32(gpu.download(buf, n)?),
                };
                Ok(Tensor {
                    shape: self.shape.clone(),
                    dtype: self.dtype,
                    storage: Storage::Cpu(data),
                })
            }
            (Storage::Cpu(data), Device::Cpu) => Ok(Tensor {
                shape: self.shape.clone(),
                dtype: self.dtype,
                storage: Storage::Cpu(match data {
                    CpuData::F32(v) => CpuData::F32(v.clone()),
                    CpuData::BF16(v) => CpuData::BF16(v.clone()),
                    CpuData::I32(v) => CpuData::I32(v.clone()),
                }),
            }),
            (Storage::Cuda(buf), Device::Cuda(gpu)) => {
                let out = gpu.alloc(self.size_in_bytes())?;
                gpu.copy_dtod(buf, &out, self.size_in_bytes())?;
                Ok(Tensor {
                    shape: self.shape.clone(),
                    dtype: self.dtype,
                    storage: Storage::Cuda(out),
                })
            }
        }
    }

    pub fn to_cpu(&self) -> Result<Tensor> {
        self.to_device(&Device::Cpu)
    }

    /// All values as f32 (bf16 widened exactly), copied from the device if needed.
    pub fn to_f32_vec(&self) -> Result<Vec<f32>> {
        match &self.storage {
            Storage::Cpu(CpuData::F32(v)) => Ok(v.clone()),
            Storage::Cpu(CpuData::BF16(v)) => Ok(v.iter().map(|x| x.to_f32()).collect()),
            Storage::Cpu(CpuData::I32(v)) => Ok(v.iter().map(|&x| x as f32).collect()),
            Storage::Cuda(_) => self.to_cpu()?.to_f32_vec(),
        }
    }

    pub fn to_i32_vec(&self) -> Result<Vec<i32>> {
        match &self.storage {
            Storage::Cpu(CpuData::I32(v)) => Ok(v.clone()),
            Storage::Cpu(_) => Err(KernelError::DType {
                op: "to_i32_vec",
                tensor: "self",
                expected: "i32".into(),
                found: self.dtype,
            }),
            Storage::Cuda(_) => self.to_cpu()?.to_i32_vec(),
        }
    }

    /// CPU values as f32 for the reference ops (borrowed when already f32).
    pub(crate) fn cpu_f32(&self) -> std::borrow::Cow<'_, [f32]> {
        match &self.storage {
            Storage::Cpu(CpuData::F32(v)) => std::borrow::Cow::Borrowed(v),
            Storage::Cpu(CpuData::BF16(v)) => v.iter().map(|x| x.to_f32()).collect(),
            Storage::Cpu(CpuData::I32(v)) => v.iter().map(|&x| x as f32).collect(),
            Storage::Cuda(_) => {
                unreachable!("cpu_f32 called on a device tensor; ops dispatch on device first")
            }
        }
    }

    #[allow(dead_code)] // used by the integer-input ops (embedding, cross-entropy labels)
    pub(crate) fn cpu_i32(&self) -> &[i32] {
        match &self.storage {
            Storage::Cpu(CpuData::I32(v)) => v,
            _ => {
                unreachable!("cpu_i32 called on a non-i32 or device tensor; ops check dtype first")
            }
        }
    }

    /// Overwrite a CPU tensor's values from f32 (rounded to its dtype). Used by in-place ops.
    pub(crate) fn cpu_store_f32(&mut self, values: &[f32]) {
        match &mut self.storage {
            Storage::Cpu(CpuData::F32(v)) => v.copy_from_slice(values),
            Storage::Cpu(CpuData::BF16(v)) => {
                for (d, &s) in v.iter_mut().zip(values) {
                    *d = bf16::from_f32(s);
                }
            }
            _ => unreachable!("cpu_store_f32 on an i32 or device tensor"),
        }
    }

    /// The device buffer of a CUDA tensor.
    pub fn cuda_buffer(&self) -> Option<&DeviceBuffer> {
        match &self.storage {
            Storage::Cuda(b) => Some(b),
            Storage::Cpu(_) => None,
        }
    }

    /// The raw device address (for kernel arguments). Callers check `is_cuda` first.
    pub(crate) fn dptr(&self) -> u64 {
        match &self.storage {
            Storage::Cuda(b) => b.ptr(),
            Storage::Cpu(_) => unreachable!("dptr of a CPU tensor; ops dispatch on device first"),
        }
    }

    pub(crate) fn gpu(&self) -> Option<&Arc<Gpu>> {
        self.cuda_buffer().map(|b| b.gpu())
    }
}
