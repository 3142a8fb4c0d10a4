//! Packing examples into fixed-length rows and serving them as micro-batches.
//!
//! Packing puts several examples in one row of `seq_len` tokens (best-fit decreasing), so
//! little compute goes to padding. Each example stays its own document: positions restart at
//! 0 and `cu_seqlens` marks the boundaries, so attention (varlen / block-diagonal) never
//! crosses documents; the padding tail of a row is a segment of its own with label -100.
//!
//! The loader is deterministic: the packing is fixed by the examples, and each epoch visits
//! the rows in an order drawn from (seed, epoch). Its position (epoch, row index) is all the
//! state a checkpoint needs to resume with the identical sequence of batches.

use std::collections::BTreeSet;

use serde::{Deserialize, Serialize};

use crate::data::{Example, IGNORE_INDEX};
use crate::rng::SplitMix64;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum PackError {
    #[error("no examples to pack")]
    Empty,
    #[error("example {index} has {len} tokens, more than the sequence length {seq_len}")]
    TooLong {
        index: usize,
        len: usize,
        seq_len: usize,
    },
    #[error("example {index} is empty")]
    EmptyExample { index: usize },
    #[error("{0}")]
    BadOption(String),
    #[error("loader position {index} is past the {rows} rows of an epoch")]
    BadPosition { index: usize, rows: usize },
}

/// Best-fit decreasing: examples longest first, each into the open row with the least room
/// that still fits it, else a new row. Returns the rows as lists of example indices.
/// `lengths` must all be in `1..=capacity`.
pub fn pack_best_fit(lengths: &[usize], capacity: usize) -> Vec<Vec<usize>> {
    let mut order: Vec<usize> = (0..lengths.len()).collect();
    // Stable sort keeps equal lengths in input order, so the plan is deterministic.
    order.sort_by_key(|&i| std::cmp::Reverse(lengths[i]));
    let mut rows: Vec<Vec<usize>> = Vec::new();
    // Open rows keyed by (room left, row id): the first key >= (len, 0) is the best fit.
    let mut open: BTreeSet<(usize, usize)> = BTreeSet::new();
    for i in order {
        let len = lengths[i];
        debug_assert!(len >= 1 && len <= capacity);
        let fit = open.range((len, 0)..).next().copied();
        let (room, row) = match fit {
            Some(key) => {
                open.remove(&key);
                key
            }
            None => {
                rows.push(Vec::new());
                (capacity, rows.len() - 1)
            }
        };
        rows[row].push(i);
        if room > len {
            open.insert((room - len, row));
        }
    }
    rows
}

/// A micro-batch: `rows` rows of `seq_len` tokens, flattened row-major.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PackedBatch {
    pub rows: usize,
    pub seq_len: usize,
    pub input_ids: Vec<u32>,
    /// Aligned with `input_ids` (the loss shifts); -100 on padding, on prompts, and on the
    /// first token of every document, so no target crosses a document boundary.
    pub labels: Vec<i32>,
    /// Position of each token within its document (restarting at 0 per document and for the
    /// padding segment), for RoPE.
    pub position_ids: Vec<i32>,
    /// Segment boundaries over the flattened batch: segment k is tokens
    /// `cu_seqlens[k]..cu_seqlens[k+1]`. Starts at 0, ends at `rows * seq_len`, and every row
    /// boundary is a segment boundary. A row's padding tail is one segment.
    pub cu_seqlens: Vec<i32>,
    /// Documents (examples) in the batch.
    pub documents: usize,
    /// Non-padding tokens.
    pub tokens: usize,
    /// Tokens with a label (what the loss averages over).
    pub label_tokens: usize,
}

impl PackedBatch {
    /// Per-position targets: `targets[i]` is the token position `i` must predict
    /// (`labels[i + 1]` within the row), -100 where nothing is predicted. For a loss that
    /// takes unshifted targets.
    pub fn targets(&self) -> Vec<i32> {
        let mut t = vec![IGNORE_INDEX; self.labels.len()];
        for r in 0..self.rows {
            let row = r * self.seq_len..(r + 1) * self.seq_len;
            t[row.start..row.end - 1].copy_from_slice(&self.labels[row.start + 1..row.end]);
        }
        t
    }

    /// Longest segment (the `max_seqlen` of varlen attention).
    pub fn max_seqlen(&self) -> usize {
        self.cu_seqlens
            .windows(2)
            .map(|w| (w[1] - w[0]) as usize)
            .max()
            .unwrap_or(0)
    }
}

/// Build a batch from rows of example indices.
pub fn build_batch(
    examples: &[Example],
    rows: &[&[usize]],
    seq_len: usize,
    pad_id: u32,
) -> PackedBatch {
    let n = rows.len() * seq_len;
    let mut b = PackedBatch {
        rows: rows.len(),
        seq_len,
        input_ids: Vec::with_capacity(n),
        labels: Vec::with_capacity(n),
        position_ids: Vec::with_capacity(n),
        cu_seqlens: vec![0],
        documents: 0,
        tokens: 0,
        label_tokens: 0,
    };
    for row in rows {
        let start = b.input_ids.len();
        for &i in row.iter() {
            let ex = &examples[i];
            b.input_ids.extend_from_slice(&ex.input_ids);
            let first = b.labels.len();
            b.labels.extend_from_slice(&ex.labels);
            b.labels[first] = IGNORE_INDEX;
            b.position_ids.extend(0..ex.len() as i32);
            b.cu_seqlens.push(b.input_ids.len() as i32);
            b.documents += 1;
            b.tokens += ex.len();
        }
        let used = b.input_ids.len() - start;
        assert!(used <= seq_len, "row of {used} tokens exceeds {seq_len}");
        let pad = seq_len - used;
        if pad > 0 {
            b.input_ids.extend(std::iter::repeat_n(pad_id, pad));
            b.labels.extend(std::iter::repeat_n(IGNORE_INDEX, pad));
            b.position_ids.extend(0..pad as i32);
            b.cu_seqlens.push(b.input_ids.len() as i32);
        }
    }
    b.label_tokens = b.labels.iter().filter(|&&l| l != IGNORE_INDEX).count();
    b
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct LoaderOptions {
    /// Tokens per row.
    pub seq_len: usize,
    /// Rows per micro-batch.
    pub micro_batch: usize,
    /// Pack several examples per row (best-fit); otherwise one example per row, padded.
    pub packing: bool,
    /// Visit rows in a seeded random order each epoch (off for evaluation).
    pub shuffle: bool,
    pub seed: u64,
}

impl Default for LoaderOptions {
    fn default() -> Self {
        Self {
            seq_len: 2048,
            micro_batch: 1,
            packing: true,
            shuffle: true,
            seed: 0,
        }
    }
}

/// Where a loader is: the next row of `epoch`'s order. Saved in checkpoints.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct LoaderPosition {
    pub epoch: u64,
    pub index: usize,
}

#[derive(Debug)]
pub struct DataLoader {
    examples: Vec<Example>,
    rows: Vec<Vec<usize>>,
    opts: LoaderOptions,
    pad_id: u32,
    order: Vec<usize>,
    pos: LoaderPosition,
}

impl DataLoader {
    pub fn new(
        examples: Vec<Example>,
        pad_id: u32,
        opts: LoaderOptions,
    ) -> Result<Self, PackError> {
        if opts.seq_len == 0 || opts.micro_batch == 0 {
            return Err(PackError::BadOption(format!(
                "seq_len ({}) and micro_batch ({}) must be positive",
                opts.seq_len, opts.micro_batch
            )));
        }
        if examples.is_empty() {
            return Err(PackError::Empty);
        }
        for (index, ex) in examples.iter().enumerate() {
            if ex.is_empty() {
                return Err(PackError::EmptyExample { index });
            }
            if ex.len() > opts.seq_len {
                return Err(PackError::TooLong {
                    index,
                    len: ex.len(),
                    seq_len: opts.seq_len,
                });
            }
        }
        let rows = if opts.packing {
            let lengths: Vec<usize> = examples.iter().map(Example::len).collect();
            pack_best_fit(&lengths, opts.seq_len)
        } else {
            (0..examples.len()).map(|i| vec![i]).collect()
        };
        let mut loader = Self {
            examples,
            rows,
            opts,
            pad_id,
            order: Vec::new(),
            pos: LoaderPosition::default(),
        };
        loader.order = loader.epoch_order(0);
        Ok(loader)
    }

    fn epoch_order(&self, epoch: u64) -> Vec<usize> {
        let mut order: Vec<usize> = (0..self.rows.len()).collect();
        if self.opts.shuffle {
            SplitMix64::for_stream(self.opts.seed, epoch).shuffle(&mut order);
        }
        order
    }

    pub fn options(&self) -> &LoaderOptions {
        &self.opts
    }

    pub fn examples(&self) -> &[Example] {
        &self.examples
    }

    pub fn rows_per_epoch(&self) -> usize {
        self.rows.len()
    }

    /// Micro-batches per epoch; the last one may have fewer rows.
    pub fn batches_per_epoch(&self) -> usize {
        self.rows.len().div_ceil(self.opts.micro_batch)
    }

    /// Non-padding tokens over all row tokens.
    pub fn packing_efficiency(&self) -> f64 {
        let tokens: usize = self.examples.iter().map(Example::len).sum();
        tokens as f64 / (self.rows.len() * self.opts.seq_len) as f64
    }

    pub fn position(&self) -> LoaderPosition {
        self.pos
    }

    /// Resume at a saved position.
    pub fn set_position(&mut self, pos: LoaderPosition) -> Result<(), PackError> {
        if pos.index > self.rows.len() {
            return Err(PackError::BadPosition {
                index: pos.index,
                rows: self.rows.len(),
            });
        }
        if pos.epoch != self.pos.epoch {
            self.order = self.epoch_order(pos.epoch);
        }
        self.pos = pos;
        Ok(())
    }

    /// The next micro-batch. Batches do not span epochs: the last one of an epoch may have
    /// fewer rows; the call after it starts the next epoch.
    pub fn next_batch(&mut self) -> PackedBatch {
        if self.pos.index >= self.rows.len() {
            self.pos = LoaderPosition {
                epoch: self.pos.epoch + 1,
                index: 0,
            };
            self.order = self.epoch_order(self.pos.epoch);
        }
        let end = (self.pos.index + self.opts.micro_batch).min(self.rows.len());
        let rows: Vec<&[usize]> = self.order[self.pos.index..end]
            .iter()
            .map(|&r| self.rows[r].as_slice())
            .collect();
        let batch = build_batch(&self.examples, &rows, self.opts.seq_len, self.pad_id);
        self.pos.index = end;
        batch
    }

    /// All rows once, in packing order, without moving the loader (for evaluation).
    pub fn batches_once(&self) -> impl Iterator<Item = PackedBatch> + '_ {
        self.rows.chunks(self.opts.micro_batch).map(move |chunk| {
            let rows: Vec<&[usize]> = chunk.iter().map(Vec::as_slice).collect();
            build_batch(&self.examples, &rows, self.opts.seq_len, self.pad_id)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Examples whose tokens encode (example index, position) so placement can be checked.
    fn examples(lengths: &[usize]) -> Vec<Example> {
        lengths
            .iter()
            .enumerate()
            .map(|(e, &n)| {
                let input_ids: Vec<u32> = (0..n).map(|p| (e * 1000 + p) as u32 + 1).collect();
                let labels = (0..n)
                    .map(|p| {
                        if p == 0 || p % 3 == 1 {
                            IGNORE_INDEX
                        } else {
                            input_ids[p] as i32
                        }
                    })
                    .collect();
                Example { input_ids, labels }
            })
            .collect()
    }

    fn lengths_from(seed: u64, n: usize, max: usize) -> Vec<usize> {
        let mut g = SplitMix64::new(seed);
        (0..n)
            .map(|_| g.range_inclusive(1, max as u64) as usize)
            .collect()
    }

    #[test]
    fn best_fit_decreasing_small_case() {
        // Optimal: {7,3} {6,4} {5,5}.
        let rows = pack_best_fit(&[6, 4, 5, 5, 3, 7], 10);
        assert_eq!(rows, vec![vec![5, 4], vec![0, 1], vec![2, 3]]);
        // Best fit, not first fit: 4 goes to the row with 4 left, not the one with 5 left.
        let rows = pack_best_fit(&[5, 6, 4], 10);
        assert_eq!(rows, vec![vec![1, 2], vec![0]]);
    }

    #[test]
    fn best_fit_places_every_example_once_within_capacity() {
        for seed in 0..5 {
            let cap = 64 + seed as usize * 37;
            let lengths = lengths_from(seed, 500, cap);
            let rows = pack_best_fit(&lengths, cap);
            let mut seen = vec![0; lengths.len()];
            for row in &rows {
                assert!(row.iter().map(|&i| lengths[i]).sum::<usize>() <= cap);
                for &i in row {
                    seen[i] += 1;
                }
            }
            assert!(seen.iter().all(|&s| s == 1));
            let total: usize = lengths.iter().sum();
            let lower = total.div_ceil(cap);
            // BFD is within 11/9 OPT + 1 of optimal; on uniform lengths it is near the bound.
            assert!(
                rows.len() <= lower * 11 / 9 + 1,
                "{} rows, bound {lower}",
                rows.len()
            );
        }
    }

    #[test]
    fn packed_batch_layout() {
        let exs = examples(&[5, 3, 7, 2]);
        let rows: Vec<&[usize]> = vec![&[2, 1], &[0, 3]];
        let b = build_batch(&exs, &rows, 12, 9999);
        assert_eq!(b.rows, 2);
        assert_eq!(b.input_ids.len(), 24);
        assert_eq!(b.cu_seqlens, [0, 7, 10, 12, 17, 19, 24]);
        assert_eq!(
            b.position_ids,
            [0, 1, 2, 3, 4, 5, 6, 0, 1, 2, 0, 1, 0, 1, 2, 3, 4, 0, 1, 0, 1, 2, 3, 4]
        );
        assert_eq!(&b.input_ids[10..12], &[9999, 9999]);
        assert_eq!(&b.input_ids[7..10], exs[1].input_ids.as_slice());
        assert_eq!(&b.labels[10..12], &[IGNORE_INDEX; 2]);
        assert_eq!((b.documents, b.tokens), (4, 17));
        assert_eq!(b.max_seqlen(), 7);
        // Labels are the examples' own, first of each document -100.
        for &start in &[0usize, 7, 12, 17] {
            assert_eq!(b.labels[start], IGNORE_INDEX);
        }
        assert_eq!(&b.labels[12..17], exs[0].labels.as_slice());
        assert_eq!(
            b.label_tokens,
            exs.iter().map(Example::label_tokens).sum::<usize>()
        );
        // Targets: shifted within the row, never into the next document's first token.
        let t = b.targets();
        assert_eq!(t[0], b.labels[1]);
        assert_eq!(t[6], IGNORE_INDEX, "last of doc 2 does not predict doc 1");
        assert_eq!(t[11], IGNORE_INDEX, "row end");
        assert_eq!(t[23], IGNORE_INDEX);
        assert_eq!(
            t.iter().filter(|&&x| x != IGNORE_INDEX).count(),
            b.label_tokens
        );
    }

    /// Invariants of any batch: segments tile the batch, positions restart exactly at segment
    /// starts, row boundaries are segment boundaries, padding carries no label.
    fn check_batch(b: &PackedBatch, pad_id: u32) {
        let n = b.rows * b.seq_len;
        assert_eq!(b.input_ids.len(), n);
        assert_eq!(b.labels.len(), n);
        assert_eq!(b.position_ids.len(), n);
        assert_eq!(b.cu_seqlens[0], 0);
        assert_eq!(*b.cu_seqlens.last().unwrap() as usize, n);
        assert!(b.cu_seqlens.windows(2).all(|w| w[0] < w[1]));
        for r in 0..=b.rows {
            assert!(b.cu_seqlens.contains(&((r * b.seq_len) as i32)));
        }
        for w in b.cu_seqlens.windows(2) {
            for (k, i) in (w[0] as usize..w[1] as usize).enumerate() {
                assert_eq!(b.position_ids[i], k as i32);
            }
            assert_eq!(b.labels[w[0] as usize], IGNORE_INDEX);
        }
        let pad = b.input_ids.iter().filter(|&&t| t == pad_id).count();
        assert_eq!(pad, n - b.tokens);
        for i in 0..n {
            if b.input_ids[i] == pad_id {
                assert_eq!(b.labels[i], IGNORE_INDEX);
            }
        }
    }

    #[test]
    fn loader_epochs_cover_every_example_once() {
        let lengths = lengths_from(3, 300, 100);
        let exs = examples(&lengths);
        let opts = LoaderOptions {
            seq_len: 128,
            micro_batch: 3,
            seed: 42,
            ..Default::default()
        };
        let mut dl = DataLoader::new(exs.clone(), 0, opts).unwrap();
        assert!(dl.packing_efficiency() > 0.9, "{}", dl.packing_efficiency());
        for epoch in 0..2 {
            let mut docs_seen = 0;
            let mut first_tokens = Vec::new();
            for _ in 0..dl.batches_per_epoch() {
                let b = dl.next_batch();
                check_batch(&b, 0);
                assert_eq!(dl.position().epoch, epoch);
                docs_seen += b.documents;
                for w in b.cu_seqlens.windows(2) {
                    let t = b.input_ids[w[0] as usize];
                    if t != 0 {
                        first_tokens.push(t);
                    }
                }
            }
            assert_eq!(docs_seen, exs.len());
            first_tokens.sort();
            let mut want: Vec<u32> = exs.iter().map(|e| e.input_ids[0]).collect();
            want.sort();
            assert_eq!(first_tokens, want, "every example exactly once per epoch");
        }
        assert_eq!(dl.position().epoch, 1);
    }

    #[test]
    fn loader_resume_gives_identical_batches() {
        let exs = examples(&lengths_from(5, 120, 60));
        let opts = LoaderOptions {
            seq_len: 64,
            micro_batch: 4,
            seed: 7,
            ..Default::default()
        };
        let mut a = DataLoader::new(exs.clone(), 0, opts.clone()).unwrap();
        let per_epoch = a.batches_per_epoch();
        // Stop part-way into the second epoch, save, and go on past the third epoch's start.
        for _ in 0..per_epoch + 2 {
            a.next_batch();
        }
        let saved = serde_json::to_string(&a.position()).unwrap();
        let rest_a: Vec<PackedBatch> = (0..2 * per_epoch).map(|_| a.next_batch()).collect();

        let mut b = DataLoader::new(exs.clone(), 0, opts.clone()).unwrap();
        b.set_position(serde_json::from_str(&saved).unwrap())
            .unwrap();
        let rest_b: Vec<PackedBatch> = (0..2 * per_epoch).map(|_| b.next_batch()).collect();
        assert_eq!(rest_a, rest_b);
        assert_eq!(a.position(), b.position());

        // Same seed from scratch: same batches; another seed: another order.
        let mut c = DataLoader::new(exs.clone(), 0, opts.clone()).unwrap();
        let mut d = DataLoader::new(exs.clone(), 0, opts.clone()).unwrap();
        let mut e = DataLoader::new(exs, 0, LoaderOptions { seed: 8, ..opts }).unwrap();
        let (bc, bd, be) = (c.next_batch(), d.next_batch(), e.next_batch());
        assert_eq!(bc, bd);
        assert_ne!(bc, be);
        // Epochs differ in order.
        let first_epoch: Vec<PackedBatch> = (1..per_epoch).map(|_| c.next_batch()).collect();
        let second_epoch: Vec<PackedBatch> = (0..per_epoch).map(|_| c.next_batch()).collect();
        assert_ne!(first_epoch[..per_epoch - 1], second_epoch[1..]);
        assert_eq!(
            b.set_position(LoaderPosition {
                epoch: 0,
                index: 10_000
            }),
            Err(PackError::BadPosition {
                index: 10_000,
                rows: b.rows_per_epoch()
            })
        );
    }

    #[test]
    fn no_packing_and_eval_mode() {
        let exs = examples(&[4, 9, 2, 6, 1]);
        let opts = LoaderOptions {
            seq_len: 10,
            micro_batch: 2,
            packing: false,
            shuffle: false,
            seed: 0,
        };
        let mut dl = DataLoader::new(exs.clone(), 7777, opts).unwrap();
        assert_eq!(dl.rows_per_epoch(), 5);
        assert_eq!(dl.batches_per_epoch(), 3);
        let batches: Vec<PackedBatch> = (0..3).map(|_| dl.next_batch()).collect();
        assert_eq!(
            batches.iter().map(|b| b.rows).collect::<Vec<_>>(),
            [2, 2, 1]
        );
        for (k, b) in batches.iter().enumerate() {
            check_batch(b, 7777);
            assert_eq!(b.documents, b.rows, "one example per row");
            for r in 0..b.rows {
                let ex = &exs[2 * k + r];
                assert_eq!(
                    &b.input_ids[r * 10..r * 10 + ex.len()],
                    ex.input_ids.as_slice()
                );
            }
        }
        let once: Vec<PackedBatch> = dl.batches_once().collect();
        assert_eq!(once, batches, "unshuffled: packing order");
        assert_eq!(dl.next_batch(), batches[0], "wraps to the next epoch");
        assert_eq!(dl.position(), LoaderPosition { epoch: 1, index: 2 });
    }

    #[test]
    fn loader_rejects_bad_input() {
        let opts = LoaderOptions {
            seq_len: 4,
            ..Default::default()
        };
        assert_eq!(
            DataLoader::new(vec![], 0, opts.clone()).unwrap_err(),
            PackError::Empty
        );
        assert_eq!(
            DataLoader::new(examples(&[3, 5]), 0, opts.clone()).unwrap_err(),
            PackError::TooLong {
                index: 1,
                len: 5,
                seq_len: 4
            }
        );
        let e = DataLoader::new(
            examples(&[3]),
            0,
            LoaderOptions {
                micro_batch: 0,
                ..opts
            },
        )
        .unwrap_err();
        assert!(matches!(e, PackError::BadOption(_)));
    }
}
