//! The all-pairs P2P matrix: every provider (function with a memory BAR) against every client
//! (endpoint, RCiEP or VF), computed on a [`Snapshot`] across all cores.

use peerdma_pci::{Bdf, DeviceKind, Fabric};

use crate::maptype::MapType;
use crate::path::{self, Snapshot};

/// One cell.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cell {
    /// Map type.
    pub map_type: MapType,
    /// Distance.
    pub distance: u32,
}

impl Cell {
    /// `BUS4`, `HB6`, `NO` (in the style of `nvidia-smi topo -m`).
    pub fn code(&self) -> String {
        match self.map_type {
            MapType::BusAddr => format!("BUS{}", self.distance),
            MapType::ThruHostBridge => format!("HB{}", self.distance),
            _ => "NO".to_string(),
        }
    }
}

/// Rows of providers, columns of clients.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Matrix {
    /// Row functions.
    pub providers: Vec<Bdf>,
    /// Column functions.
    pub clients: Vec<Bdf>,
    cells: Vec<Cell>,
}

/// Functions with at least one memory BAR, in address order.
pub fn providers(fabric: &Fabric) -> Vec<Bdf> {
    let mut v: Vec<Bdf> = fabric
        .functions()
        .filter(|f| f.bars().any(|b| b.kind.is_mem()))
        .map(peerdma_pci::Function::bdf)
        .collect();
    v.sort();
    v
}

/// Endpoint, RCiEP and VF functions, in address order.
pub fn clients(fabric: &Fabric) -> Vec<Bdf> {
    let mut v: Vec<Bdf> = fabric
        .functions()
        .filter(|f| {
            matches!(
                f.kind(),
                DeviceKind::Endpoint | DeviceKind::Rciep | DeviceKind::Vf
            )
        })
        .map(peerdma_pci::Function::bdf)
        .collect();
    v.sort();
    v
}

impl Matrix {
    /// Computes every provider against every client.
    pub fn compute(fabric: &Fabric) -> Matrix {
        let snap = Snapshot::of(fabric);
        Matrix::compute_on(&snap, providers(fabric), clients(fabric))
    }

    /// Computes on a snapshot, splitting rows across the machine's cores.
    pub fn compute_on(snap: &Snapshot, providers: Vec<Bdf>, clients: Vec<Bdf>) -> Matrix {
        let pn: Vec<u32> = providers.iter().filter_map(|&b| snap.node(b)).collect();
        let cn: Vec<u32> = clients.iter().filter_map(|&b| snap.node(b)).collect();
        let width = cn.len();
        let mut cells = vec![
            Cell {
                map_type: MapType::Unknown,
                distance: 0
            };
            pn.len() * width
        ];
        if width > 0 {
            let threads = std::thread::available_parallelism().map_or(1, std::num::NonZero::get);
            let rows_per = pn.len().div_ceil(threads).max(1);
            std::thread::scope(|s| {
                for (rows, out) in pn.chunks(rows_per).zip(cells.chunks_mut(rows_per * width)) {
                    let cn = &cn;
                    s.spawn(move || {
                        for (r, &p) in rows.iter().enumerate() {
                            for (k, &c) in cn.iter().enumerate() {
                                let o = path::calc(snap, p, c, |_| {});
                                out[r * width + k] = Cell {
                                    map_type: o.map_type,
                                    distance: o.distance,
                                };
                            }
                        }
                    });
                }
            });
        }
        Matrix {
            providers,
            clients,
            cells,
        }
    }

    /// The cell of a provider row and client column.
    pub fn cell(&self, row: usize, col: usize) -> Cell {
        self.cells[row * self.clients.len() + col]
    }

    /// The cell for a pair, by address.
    pub fn get(&self, provider: Bdf, client: Bdf) -> Option<Cell> {
        let r = self.providers.iter().position(|&b| b == provider)?;
        let c = self.clients.iter().position(|&b| b == client)?;
        Some(self.cell(r, c))
    }

    /// How many cells have each map type: (bus_addr, thru_host_bridge, not_supported).
    pub fn counts(&self) -> (usize, usize, usize) {
        let mut n = (0, 0, 0);
        for c in &self.cells {
            match c.map_type {
                MapType::BusAddr => n.0 += 1,
                MapType::ThruHostBridge => n.1 += 1,
                _ => n.2 += 1,
            }
        }
        n
    }
}
