//! The modules that produce virtual tokens and key/value prefixes: [`PromptEncoder`] (prompt
//! tuning and P-tuning, in the embedding slot), [`PrefixEncoder`] (prefix tuning, in the
//! key/value slot) and the bidirectional [`Lstm`] of P-tuning, all computing what peft's
//! `PromptEmbedding`, `PromptEncoder` and `PrefixEncoder` compute.

use burn::module::{Module, Param};
use burn::nn::{Dropout, DropoutConfig, Linear};
use burn::prelude::*;
use burn::tensor::Distribution;
use burn::tensor::activation::{relu, sigmoid};
use peft_core::inject::{EmbeddingAdapter, KvAdapter, LinearWeight};

/// A linear layer initialised as torch's `nn.Linear`: weight and bias uniform in
/// `±1/sqrt(in)`.
pub(crate) fn torch_linear<B: Backend>(inp: usize, out: usize, device: &B::Device) -> Linear<B> {
    let bound = 1.0 / (inp as f64).sqrt();
    let w = Tensor::<B, 2>::random([out, inp], Distribution::Uniform(-bound, bound), device);
    let b = Tensor::<B, 1>::random([out], Distribution::Uniform(-bound, bound), device);
    <Linear<B> as LinearWeight<B>>::from_dense(w, Some(b))
}

/// One direction of one LSTM layer, with torch's parameters and layouts: `weight_ih`
/// `[4h, in]`, `weight_hh` `[4h, h]`, biases `[4h]`, gates in the order input, forget, cell,
/// output.
#[derive(Module, Debug)]
pub struct LstmCell<B: Backend> {
    /// Input-to-hidden weights `[4h, in]`.
    pub weight_ih: Param<Tensor<B, 2>>,
    /// Hidden-to-hidden weights `[4h, h]`.
    pub weight_hh: Param<Tensor<B, 2>>,
    /// Input-to-hidden bias `[4h]`.
    pub bias_ih: Param<Tensor<B, 1>>,
    /// Hidden-to-hidden bias `[4h]`.
    pub bias_hh: Param<Tensor<B, 1>>,
}

impl<B: Backend> LstmCell<B> {
    /// A cell initialised as torch's `nn.LSTM`: every parameter uniform in `±1/sqrt(h)`.
    pub fn new(input: usize, hidden: usize, device: &B::Device) -> Self {
        let k = 1.0 / (hidden as f64).sqrt();
        let u = Distribution::Uniform(-k, k);
        Self {
            weight_ih: Param::from_tensor(Tensor::random([4 * hidden, input], u, device)),
            weight_hh: Param::from_tensor(Tensor::random([4 * hidden, hidden], u, device)),
            bias_ih: Param::from_tensor(Tensor::random([4 * hidden], u, device)),
            bias_hh: Param::from_tensor(Tensor::random([4 * hidden], u, device)),
        }
    }

    /// Hidden size `h`.
    pub fn hidden_size(&self) -> usize {
        self.weight_hh.shape().dims::<2>()[1]
    }

    /// Runs over a sequence `x: [n, in]` from zero states, backwards when `reverse`;
    /// returns the hidden state at every step, in the sequence's order, `[n, h]`.
    pub fn run(&self, x: Tensor<B, 2>, reverse: bool) -> Tensor<B, 2> {
        let [n, _] = x.dims();
        let h_size = self.hidden_size();
        let device = x.device();
        let bias = (self.bias_ih.val() + self.bias_hh.val()).unsqueeze::<2>();
        let xi = x.matmul(self.weight_ih.val().transpose()) + bias; // [n, 4h]
        let w_hh = self.weight_hh.val().transpose(); // [h, 4h]
        let mut h = Tensor::<B, 2>::zeros([1, h_size], &device);
        let mut c = Tensor::<B, 2>::zeros([1, h_size], &device);
        let mut out = vec![None; n];
        let order: Vec<usize> = if reverse {
            (0..n).rev().collect()
        } else {
            (0..n).collect()
        };
        for t in order {
            let g = xi.clone().slice([t..t + 1, 0..4 * h_size]) + h.matmul(w_hh.clone());
            let gate = |i: usize| g.clone().slice([0..1, i * h_size..(i + 1) * h_size]);
            let (i, f, cell, o) = (
                sigmoid(gate(0)),
                sigmoid(gate(1)),
                gate(2).tanh(),
                sigmoid(gate(3)),
            );
            c = f * c + i * cell;
            h = o * c.clone().tanh();
            out[t] = Some(h.clone());
        }
        Tensor::cat(out.into_iter().flatten().collect(), 0)
    }
}

/// torch's `nn.LSTM(bidirectional=True, batch_first=True)` on one sequence: per layer a
/// forward and a reverse [`LstmCell`], their outputs concatenated (`[n, 2h]`), dropout
/// between layers (in training only, as torch).
#[derive(Module, Debug)]
pub struct Lstm<B: Backend> {
    /// Forward cells, one per layer (`weight_ih_l{k}`, ...).
    pub forward_cells: Vec<LstmCell<B>>,
    /// Reverse cells, one per layer (`weight_ih_l{k}_reverse`, ...).
    pub reverse_cells: Vec<LstmCell<B>>,
    /// Dropout on the output of every layer but the last.
    pub dropout: Dropout,
}

impl<B: Backend> Lstm<B> {
    /// A bidirectional LSTM of `layers` layers, initialised as torch's.
    pub fn new(
        input: usize,
        hidden: usize,
        layers: usize,
        dropout: f64,
        device: &B::Device,
    ) -> Self {
        let cell =
            |l: usize| LstmCell::new(if l == 0 { input } else { 2 * hidden }, hidden, device);
        Self {
            forward_cells: (0..layers).map(cell).collect(),
            reverse_cells: (0..layers).map(cell).collect(),
            dropout: DropoutConfig::new(dropout).init(),
        }
    }

    /// The outputs `[n, 2h]` for a sequence `x: [n, in]`.
    pub fn forward(&self, x: Tensor<B, 2>) -> Tensor<B, 2> {
        let layers = self.forward_cells.len();
        let mut x = x;
        for (l, (f, r)) in self
            .forward_cells
            .iter()
            .zip(&self.reverse_cells)
            .enumerate()
        {
            x = Tensor::cat(vec![f.run(x.clone(), false), r.run(x, true)], 1);
            if l + 1 < layers {
                x = self.dropout.forward(x);
            }
        }
        x
    }
}

/// Virtual tokens: prompt tuning's learned embeddings, or P-tuning's embeddings passed
/// through a prompt encoder (an MLP, or a bidirectional LSTM followed by an MLP).
///
/// As in peft: the MLP encoder is `Linear(d, h) ReLU Linear(h, h) ReLU Linear(h, d)`; the
/// LSTM encoder is `LSTM(d, h, layers, bidirectional)` then `Linear(2h, 2h) ReLU
/// Linear(2h, d)`. An adapter loaded from a file holds only the final embeddings (what
/// peft saves), with no encoder.
#[derive(Module, Debug)]
pub struct PromptEncoder<B: Backend> {
    /// The embedding table `[num_virtual_tokens, d]` (peft's `embedding.weight`).
    pub embedding: Param<Tensor<B, 2>>,
    /// P-tuning's LSTM (peft's `lstm_head`).
    pub lstm_head: Option<Lstm<B>>,
    /// P-tuning's MLP (peft's `mlp_head`): linear layers with ReLU between them.
    pub mlp_head: Vec<Linear<B>>,
}

impl<B: Backend> PromptEncoder<B> {
    /// Fixed embeddings `[n, d]`: prompt tuning, or any adapter loaded from a file.
    pub fn from_embeddings(embeddings: Tensor<B, 2>) -> Self {
        Self {
            embedding: Param::from_tensor(embeddings),
            lstm_head: None,
            mlp_head: Vec::new(),
        }
    }

    /// Number of virtual tokens.
    pub fn num_virtual_tokens(&self) -> usize {
        self.embedding.shape().dims::<2>()[0]
    }

    /// The virtual-token embeddings `[n, d]`: the table, through the encoder if any.
    pub fn embeddings(&self) -> Tensor<B, 2> {
        let mut x = self.embedding.val();
        if let Some(lstm) = &self.lstm_head {
            x = lstm.forward(x);
        }
        let last = self.mlp_head.len();
        for (i, l) in self.mlp_head.iter().enumerate() {
            x = l.forward(x);
            if i + 1 < last {
                x = relu(x);
            }
        }
        x
    }
}

impl<B: Backend> EmbeddingAdapter<B> for PromptEncoder<B> {
    fn virtual_tokens(&self, batch: usize) -> Option<Tensor<B, 3>> {
        Some(self.embeddings().unsqueeze::<3>().repeat_dim(0, batch))
    }

    fn num_virtual_tokens(&self) -> usize {
        PromptEncoder::num_virtual_tokens(self)
    }
}

/// Prefix tuning's learned keys and values for every layer.
///
/// The prefix is a table `[n, layers * 2 * kv_dim]` (`kv_dim = kv_heads * head_dim`), or,
/// with `prefix_projection`, `transform(embedding)` with `embedding: [n, kv_dim]` and
/// `transform = Linear(kv_dim, h) Tanh Linear(h, layers * 2 * kv_dim)`. Each row lays out,
/// as peft's `past_key_values` view, for every layer its keys then its values, each
/// `[kv_heads, head_dim]`.
#[derive(Module, Debug)]
pub struct PrefixEncoder<B: Backend> {
    /// The table (peft's `embedding.weight`).
    pub embedding: Param<Tensor<B, 2>>,
    /// The reparameterisation MLP (peft's `transform`): empty, or two linear layers.
    pub transform: Vec<Linear<B>>,
    /// Decoder layers.
    pub num_layers: usize,
    /// Key/value heads.
    pub num_heads: usize,
    /// Head width.
    pub head_dim: usize,
}

impl<B: Backend> PrefixEncoder<B> {
    /// A prefix given as the flattened table `[n, layers * 2 * heads * head_dim]` (what
    /// peft saves).
    pub fn from_table(
        table: Tensor<B, 2>,
        num_layers: usize,
        num_heads: usize,
        head_dim: usize,
    ) -> Self {
        Self {
            embedding: Param::from_tensor(table),
            transform: Vec::new(),
            num_layers,
            num_heads,
            head_dim,
        }
    }

    /// Number of virtual positions.
    pub fn num_virtual_tokens(&self) -> usize {
        self.embedding.shape().dims::<2>()[0]
    }

    /// The whole flattened prefix `[n, layers * 2 * kv_dim]` (what peft saves).
    pub fn table(&self) -> Tensor<B, 2> {
        match self.transform.as_slice() {
            [a, b] => b.forward(a.forward(self.embedding.val()).tanh()),
            _ => self.embedding.val(),
        }
    }

    /// Keys and values of one layer, `[n, 2 * kv_dim]`; with the projection only the
    /// columns of that layer are computed.
    fn layer_columns(&self, layer: usize) -> Tensor<B, 2> {
        let n = self.num_virtual_tokens();
        let kv = self.num_heads * self.head_dim;
        let cols = 2 * layer * kv..2 * (layer + 1) * kv;
        match self.transform.as_slice() {
            [a, b] => {
                let h = a.forward(self.embedding.val()).tanh();
                let [hidden, _] = b.weight.shape().dims();
                let w = b.weight.val().slice([0..hidden, cols.clone()]);
                let y = h.matmul(w);
                match &b.bias {
                    Some(bias) => y + bias.val().slice([cols]).unsqueeze::<2>(),
                    None => y,
                }
            }
            _ => self.embedding.val().slice([0..n, cols]),
        }
    }
}

impl<B: Backend> KvAdapter<B> for PrefixEncoder<B> {
    fn prefix(&self, layer: usize, batch: usize) -> Option<(Tensor<B, 4>, Tensor<B, 4>)> {
        if layer >= self.num_layers {
            return None;
        }
        let n = self.num_virtual_tokens();
        let (h, d) = (self.num_heads, self.head_dim);
        // [n, 2, heads, d] -> [2, heads, n, d]
        let kv = self
            .layer_columns(layer)
            .reshape([n, 2, h, d])
            .permute([1, 2, 0, 3]);
        let part = |i: usize| {
            kv.clone()
                .slice([i..i + 1, 0..h, 0..n, 0..d])
                .repeat_dim(0, batch)
        };
        Some((part(0), part(1)))
    }

    fn num_virtual_tokens(&self) -> usize {
        PrefixEncoder::num_virtual_tokens(self)
    }
}
