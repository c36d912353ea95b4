//! GPUs through NVML. nvml-wrapper loads `libnvidia-ml` at run time: a host without the
//! library, the driver or a GPU gets an empty list and a note, never an error.

use super::GpuProbe;

/// Lists the GPUs with their memory; the note says why the list is empty, if it is.
pub fn probe() -> (Vec<GpuProbe>, Option<String>) {
    use nvml_wrapper::Nvml;
    use nvml_wrapper::enum_wrappers::device::Clock;

    let nvml = match Nvml::init() {
        Ok(n) => n,
        Err(e) => {
            return (
                Vec::new(),
                Some(format!("no NVIDIA GPU: NVML not available ({e})")),
            );
        }
    };
    let count = match nvml.device_count() {
        Ok(c) => c,
        Err(e) => {
            return (
                Vec::new(),
                Some(format!("NVML: cannot count devices ({e})")),
            );
        }
    };
    let mut gpus = Vec::new();
    let mut notes = Vec::new();
    for index in 0..count {
        let dev = match nvml.device_by_index(index) {
            Ok(d) => d,
            Err(e) => {
                notes.push(format!("GPU {index}: {e}"));
                continue;
            }
        };
        let mem = match dev.memory_info() {
            Ok(m) => m,
            Err(e) => {
                notes.push(format!("GPU {index}: no memory info ({e})"));
                continue;
            }
        };
        // Peak bandwidth: bus width (bits) / 8 * memory clock (MHz) * 2 (double data rate).
        let memory_bandwidth = match (dev.memory_bus_width(), dev.max_clock_info(Clock::Memory)) {
            (Ok(bits), Ok(mhz)) if bits > 0 && mhz > 0 => {
                Some(u64::from(bits) / 8 * u64::from(mhz) * 1_000_000 * 2)
            }
            _ => None,
        };
        // PCIe: per-lane bytes/s by generation (after encoding overhead) times lanes.
        let pcie_bandwidth = match (dev.max_pcie_link_gen(), dev.max_pcie_link_width()) {
            (Ok(generation), Ok(width)) if width > 0 => {
                let per_lane: u64 = match generation {
                    1 => 250_000_000,
                    2 => 500_000_000,
                    3 => 985_000_000,
                    4 => 1_969_000_000,
                    5 => 3_938_000_000,
                    _ => 7_563_000_000,
                };
                Some(per_lane * u64::from(width))
            }
            _ => None,
        };
        gpus.push(GpuProbe {
            index,
            name: dev.name().unwrap_or_else(|_| format!("GPU {index}")),
            total_memory: mem.total,
            free_memory: mem.free,
            memory_bandwidth,
            pcie_bandwidth,
        });
    }
    let note = if gpus.is_empty() && notes.is_empty() {
        Some("NVML found no GPU".into())
    } else if notes.is_empty() {
        None
    } else {
        Some(notes.join("; "))
    };
    (gpus, note)
}
