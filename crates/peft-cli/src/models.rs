//! `peft generate`, `peft logits` and `peft inspect`.

use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use burn::prelude::*;
use burn::tensor::TensorData;
use clap::{Args, ValueEnum};
use peft_core::model::AdaptableModel;
use peft_core::target::ModuleKind;
use peft_lora::LoraSlot;
use peft_models::generate::GenerationConfig;
use peft_models::tokenizer::{ChatMessage, Tokenizer};
use peft_models::{AnyCausalLm, CausalLm, ForwardInput};

/// Where the model runs.
#[derive(Clone, Copy, Debug, ValueEnum)]
pub enum Device {
    /// The CPU, with the fastest CPU backend compiled in (flex, else ndarray).
    Cpu,
    /// The CPU with burn's ndarray backend.
    Ndarray,
    /// The CPU with burn's flex backend.
    Flex,
    /// A GPU through wgpu (Vulkan, Metal, DX12; Mesa's software Vulkan on the CPU).
    Wgpu,
    /// An NVIDIA GPU through CUDA.
    Cuda,
}

/// Arguments of `peft generate`.
#[derive(Args, Debug)]
pub struct GenerateArgs {
    /// A Hugging Face model directory or a .gguf file.
    #[arg(long)]
    pub model: PathBuf,
    /// The prompt.
    #[arg(long)]
    pub prompt: String,
    /// Apply the model's chat template (the prompt is the user's message).
    #[arg(long)]
    pub chat: bool,
    /// A system message (with --chat).
    #[arg(long)]
    pub system: Option<String>,
    /// How many tokens to generate at most.
    #[arg(long, default_value_t = 128)]
    pub max_new_tokens: usize,
    /// Sampling temperature (turns sampling on).
    #[arg(long)]
    pub temperature: Option<f64>,
    /// Keep only the k most likely tokens (turns sampling on).
    #[arg(long)]
    pub top_k: Option<usize>,
    /// Nucleus sampling: keep the smallest set reaching this probability (turns sampling on).
    #[arg(long)]
    pub top_p: Option<f64>,
    /// Penalise tokens already present (1.0 = off), as transformers does.
    #[arg(long, default_value_t = 1.0)]
    pub repetition_penalty: f64,
    /// Seed of the sampler.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Adapters to run with.
    #[command(flatten)]
    pub adapters: AdapterArgs,
    /// Where to run.
    #[arg(long, value_enum, default_value_t = Device::Cpu)]
    pub device: Device,
}

/// `--adapter DIR` (repeatable) and `--merge`, shared by the commands that run a model.
#[derive(Args, Debug)]
pub struct AdapterArgs {
    /// An adapter directory in the PEFT format (repeatable; all are active together).
    #[arg(long = "adapter")]
    pub adapters: Vec<PathBuf>,
    /// Merge the adapters into the weights before running.
    #[arg(long)]
    pub merge: bool,
}

/// Arguments of `peft logits`.
#[derive(Args, Debug)]
pub struct LogitsArgs {
    /// A Hugging Face model directory or a .gguf file.
    #[arg(long)]
    pub model: PathBuf,
    /// Comma-separated token ids, e.g. 1,2,3.
    #[arg(long)]
    pub ids: String,
    /// The output safetensors file.
    #[arg(long)]
    pub out: PathBuf,
    /// Adapters to run with.
    #[command(flatten)]
    pub adapters: AdapterArgs,
    /// Where to run.
    #[arg(long, value_enum, default_value_t = Device::Cpu)]
    pub device: Device,
}

/// Arguments of `peft merge`.
#[derive(Args, Debug)]
pub struct MergeArgs {
    /// The base model: a Hugging Face directory or a .gguf file (Llama family).
    #[arg(long)]
    pub model: PathBuf,
    /// An adapter directory in the PEFT format (repeatable; merged in order).
    #[arg(long = "adapter", required = true)]
    pub adapters: Vec<PathBuf>,
    /// The output Hugging Face directory (config.json, model.safetensors, tokenizer files).
    #[arg(long)]
    pub out: PathBuf,
}

/// Arguments of `peft quantize`.
#[derive(Args, Debug)]
pub struct QuantizeArgs {
    /// The model: a Hugging Face directory or a .gguf file (Llama family).
    #[arg(long)]
    pub model: PathBuf,
    /// The output directory (bitsandbytes layout: transformers loads it with bitsandbytes).
    #[arg(long)]
    pub out: PathBuf,
    /// nf4 (default) or fp4.
    #[arg(long, default_value = "nf4")]
    pub quant_type: String,
    /// Values per absmax block (32 to 4096, a power of two).
    #[arg(long, default_value_t = 64)]
    pub blocksize: usize,
    /// Quantize the absmax values too (8-bit, blocks of 256), as bitsandbytes'
    /// bnb_4bit_use_double_quant.
    #[arg(long)]
    pub double_quant: bool,
}

/// `peft quantize`: writes a 4-bit checkpoint in the bitsandbytes layout.
pub fn quantize(a: &QuantizeArgs) -> Result<()> {
    type B = burn::backend::Flex;
    let device = Default::default();
    let config = peft_qlora::QuantConfig::new()
        .with_quant_type(peft_qlora::QuantType::parse(&a.quant_type)?)
        .with_blocksize(a.blocksize)
        .with_double_quant(a.double_quant);
    let path = crate::train::resolve_model(&a.model);
    let model: peft_qlora::QloraLlama<B> = peft_qlora::load_qlora_llama(&path, &config, &device)?;
    let memory = peft_qlora::base_memory(&model);
    peft_cli::output::staged(&a.out, |out| {
        peft_qlora::save_bnb_llama(&model, out)?;
        if let Ok(tok) = load_tokenizer(&path) {
            peft_models::export::save_tokenizer(&tok, out)?;
        }
        Ok(())
    })?;
    println!(
        "quantized {} linear weights to {} (block {}{}): {:.3} bytes per weight; wrote {}",
        memory.weights,
        a.quant_type,
        a.blocksize,
        if a.double_quant {
            ", double quantization"
        } else {
            ""
        },
        memory.bytes_per_parameter(),
        a.out.display()
    );
    Ok(())
}

/// Arguments of `peft inspect`.
#[derive(Args, Debug)]
pub struct InspectArgs {
    /// A Hugging Face model directory or a .gguf file.
    #[arg(long)]
    pub model: PathBuf,
    /// Print JSON.
    #[arg(long)]
    pub json: bool,
}

/// Runs `$body` with `B` bound to the backend chosen by `$device`.
#[macro_export]
macro_rules! with_backend {
    ($device:expr, |$b:ident, $dev:ident| $body:expr) => {{
        match $device {
            #[cfg(feature = "flex")]
            Device::Cpu | Device::Flex => {
                type $b = burn::backend::Flex;
                let $dev = Default::default();
                $body
            }
            #[cfg(all(not(feature = "flex"), feature = "ndarray"))]
            Device::Cpu => {
                type $b = burn::backend::NdArray;
                let $dev = Default::default();
                $body
            }
            #[cfg(feature = "ndarray")]
            Device::Ndarray => {
                type $b = burn::backend::NdArray;
                let $dev = Default::default();
                $body
            }
            #[cfg(feature = "wgpu")]
            Device::Wgpu => {
                type $b = burn::backend::Wgpu;
                let $dev = Default::default();
                $body
            }
            #[cfg(feature = "cuda")]
            Device::Cuda => {
                type $b = burn::backend::Cuda;
                let $dev = Default::default();
                $body
            }
            #[allow(unreachable_patterns)]
            other => bail!("this `peft` was built without the backend for `--device {other:?}`; rebuild with `--features {}`", format!("{other:?}").to_lowercase()),
        }
    }};
}

/// A causal LM with LoRA slots on its linear layers (empty when no adapter is given).
pub type Lm<B> = AnyCausalLm<B, LoraSlot<B>>;

fn attach<B, M>(model: &mut M, adapters: &[PathBuf], merge: bool, device: &B::Device) -> Result<()>
where
    B: Backend,
    M: peft_lora::LoraModel<B>,
{
    let mut names = Vec::new();
    for (i, dir) in adapters.iter().enumerate() {
        let name = format!("adapter{i}");
        // The full loader also takes `bias`, `lora_bias` and `modules_to_save` adapters.
        peft_lora::load_adapter_full(model, dir, &name, device)
            .with_context(|| format!("loading the adapter in {}", dir.display()))?;
        names.push(name);
    }
    if !names.is_empty() {
        let refs: Vec<&str> = names.iter().map(String::as_str).collect();
        peft_core::model::set_active_adapters(model, &refs)?;
        if merge {
            peft_core::model::merge_adapters(model, None, true)?;
        }
    }
    Ok(())
}

/// Loads a model (HF directory or GGUF) with the given adapters attached.
pub fn load_lm<B: Backend>(
    path: &Path,
    adapters: &[PathBuf],
    merge: bool,
    device: &B::Device,
) -> Result<Lm<B>> {
    let mut model: Lm<B> = peft_models::load_causal_lm_with(path, device)?;
    match &mut model {
        Lm::Llama(m) => attach(m, adapters, merge, device)?,
        Lm::Gpt2(m) => attach(m, adapters, merge, device)?,
    }
    Ok(model)
}

/// Loads a model with adapters of any method this build has: LoRA (any architecture),
/// (IA)^3, bottleneck adapters, prompt tuning, P-tuning and prefix tuning (Llama family;
/// LoRA together with one prompt-learning adapter too). `merge` applies to the methods
/// that merge (LoRA, (IA)^3).
pub fn load_any<B: Backend + 'static>(
    path: &Path,
    adapters: &[PathBuf],
    merge: bool,
    device: &B::Device,
) -> Result<Box<dyn CausalLm<B>>> {
    let mut types = Vec::new();
    for dir in adapters {
        let t = peft_core::config::read_peft_type(dir)
            .with_context(|| format!("reading the adapter in {}", dir.display()))?;
        types.push(t);
    }
    let is_prompt = |t: &str| matches!(t, "PROMPT_TUNING" | "P_TUNING" | "PREFIX_TUNING");
    if types.iter().all(|t| t == "LORA") {
        return Ok(Box::new(load_lm::<B>(path, adapters, merge, device)?));
    }
    let names: Vec<String> = (0..adapters.len()).map(|i| format!("adapter{i}")).collect();
    let refs: Vec<&str> = names.iter().map(String::as_str).collect();
    match types.as_slice() {
        [t] if t == "IA3" => {
            let mut m: peft_adapter::Ia3Llama<B> = peft_models::load_llama(path, device)?;
            peft_adapter::ia3::load_adapter(&mut m, &adapters[0], &names[0], device)?;
            if merge {
                peft_core::model::merge_adapters(&mut m, None, true)?;
            }
            Ok(Box::new(m))
        }
        [t] if t == "BOTTLENECK" => {
            let mut m: peft_adapter::BottleneckLlama<B> = peft_models::load_llama(path, device)?;
            peft_adapter::bottleneck::load_adapter(&mut m, &adapters[0], &names[0], device)?;
            Ok(Box::new(m))
        }
        ts if ts.iter().filter(|t| is_prompt(t)).count() == 1
            && ts.iter().all(|t| t == "LORA" || is_prompt(t)) =>
        {
            let mut m: peft_prompt::LoraPromptLlama<B> = peft_models::load_llama(path, device)?;
            for ((dir, t), name) in adapters.iter().zip(ts).zip(&names) {
                if t == "LORA" {
                    peft_lora::load_adapter(&mut m, dir, name, device)
                        .with_context(|| format!("loading the adapter in {}", dir.display()))?;
                } else {
                    peft_prompt::load_adapter(&mut m, dir, name, device)
                        .with_context(|| format!("loading the adapter in {}", dir.display()))?;
                }
            }
            peft_core::model::set_active_adapters(&mut m, &refs)?;
            if merge {
                peft_core::model::merge_adapters(&mut m, None, true)?;
            }
            Ok(Box::new(m))
        }
        ts => bail!(
            "this build runs LoRA adapters together, or one (IA)^3, bottleneck or \
             prompt-learning adapter (the last optionally with LoRA adapters); got {}",
            ts.join(" + ")
        ),
    }
}

fn is_gguf(path: &Path) -> bool {
    path.extension()
        .is_some_and(|e| e.eq_ignore_ascii_case("gguf"))
}

pub fn load_tokenizer(model: &Path) -> Result<Tokenizer> {
    Ok(if is_gguf(model) {
        peft_models::gguf_model::load_tokenizer(model)?
    } else {
        Tokenizer::from_hf_dir(model)?
    })
}

/// `peft generate`.
pub fn generate(a: &GenerateArgs) -> Result<()> {
    with_backend!(a.device, |B, device| generate_on::<B>(a, &device))
}

fn generate_on<B: Backend>(a: &GenerateArgs, device: &B::Device) -> Result<()> {
    let model = load_any::<B>(&a.model, &a.adapters.adapters, a.adapters.merge, device)?;
    let tokenizer = load_tokenizer(&a.model)?;
    let ids = if a.chat {
        let mut msgs = Vec::new();
        if let Some(s) = &a.system {
            msgs.push(ChatMessage::system(s.clone()));
        }
        msgs.push(ChatMessage::user(a.prompt.clone()));
        let text = tokenizer.apply_chat_template(&msgs, true)?;
        tokenizer.encode(&text, false)?
    } else {
        tokenizer.encode(&a.prompt, true)?
    };
    let do_sample = a.temperature.is_some() || a.top_k.is_some() || a.top_p.is_some();
    let mut eos = model.eos_token_ids();
    for id in tokenizer.eos_token_ids() {
        if !eos.contains(id) {
            eos.push(*id);
        }
    }
    let cfg = GenerationConfig {
        max_new_tokens: a.max_new_tokens,
        do_sample,
        temperature: a.temperature.unwrap_or(1.0),
        top_k: a.top_k.unwrap_or(0),
        top_p: a.top_p.unwrap_or(1.0),
        repetition_penalty: a.repetition_penalty,
        eos_token_ids: eos,
        seed: a.seed,
    };
    let mut stream = tokenizer.decode_stream();
    let mut stdout = std::io::stdout().lock();
    let mut failed = None;
    peft_models::generate::generate(&model, &ids, &cfg, device, |t| match stream.step(t) {
        Ok(Some(text)) => {
            let _ = stdout.write_all(text.as_bytes());
            let _ = stdout.flush();
        }
        Ok(None) => {}
        Err(e) => failed = Some(e),
    })?;
    writeln!(stdout)?;
    if let Some(e) = failed {
        return Err(e.into());
    }
    Ok(())
}

/// `peft logits`.
pub fn logits(a: &LogitsArgs) -> Result<()> {
    let ids: Vec<i32> = a
        .ids
        .split(',')
        .map(|s| {
            s.trim()
                .parse::<u32>()
                .map(|v| v as i32)
                .with_context(|| format!("`{s}` in --ids is not a token id"))
        })
        .collect::<Result<_>>()?;
    if ids.is_empty() {
        bail!("--ids is empty");
    }
    with_backend!(a.device, |B, device| logits_on::<B>(a, &ids, &device))
}

fn logits_on<B: Backend>(a: &LogitsArgs, ids: &[i32], device: &B::Device) -> Result<()> {
    let model = load_any::<B>(&a.model, &a.adapters.adapters, a.adapters.merge, device)?;
    let vocab = model.vocab_size();
    if let Some(bad) = ids.iter().find(|&&i| i as usize >= vocab) {
        bail!("token id {bad} is outside the vocabulary (size {vocab})");
    }
    let n = ids.len();
    let t =
        Tensor::<B, 1, Int>::from_data(TensorData::new(ids.to_vec(), [n]), device).unsqueeze::<2>();
    let logits = model
        .forward(ForwardInput::new(t), None)
        .reshape([n, vocab])
        .into_data()
        .convert::<f32>();
    peft_core::format::TensorFile::write(&a.out, vec![("logits".to_string(), logits)])?;
    println!("wrote logits [{n}, {vocab}] to {}", a.out.display());
    Ok(())
}

/// `peft merge`: merges adapters into a Llama-family base and writes a Hugging Face
/// directory that transformers loads.
pub fn merge(a: &MergeArgs) -> Result<()> {
    type B = burn::backend::Flex;
    let device = Default::default();
    let Lm::Llama(model) = load_lm::<B>(&a.model, &a.adapters, true, &device)? else {
        bail!(
            "`peft merge` writes Llama-family models; {} is GPT-2",
            a.model.display()
        );
    };
    let tokenizer = load_tokenizer(&a.model).ok();
    if tokenizer.is_none() {
        tracing::warn!(
            "no tokenizer found next to {}; the output has none",
            a.model.display()
        );
    }
    peft_cli::output::staged(&a.out, |out| {
        peft_models::export::save_llama_hf(&model, tokenizer.as_ref(), out)?;
        if !is_gguf(&a.model) {
            for f in [
                "tokenizer_config.json",
                "special_tokens_map.json",
                "chat_template.jinja",
                "generation_config.json",
            ] {
                let src = a.model.join(f);
                if src.exists() {
                    std::fs::copy(&src, out.join(f))
                        .with_context(|| format!("copying {}", src.display()))?;
                }
            }
        }
        Ok(())
    })?;
    println!(
        "merged {} adapter(s) into {}; wrote {}",
        a.adapters.len(),
        a.model.display(),
        a.out.display()
    );
    Ok(())
}

/// `peft inspect`.
pub fn inspect(a: &InspectArgs) -> Result<()> {
    type B = burn::backend::NdArray;
    let device = Default::default();
    let model: AnyCausalLm<B> = peft_models::load_causal_lm(&a.model, &device)?;
    let (arch, params, modules) = match &model {
        AnyCausalLm::Llama(m) => (
            format!("{:?} (Llama family)", m.config.flavor),
            m.num_params(),
            m.modules(),
        ),
        AnyCausalLm::Gpt2(m) => ("GPT-2".to_string(), m.num_params(), m.modules()),
    };
    let targets: Vec<&str> = modules
        .iter()
        .filter(|m| m.kind == ModuleKind::Linear)
        .map(|m| m.path.as_str())
        .collect();
    let names: std::collections::BTreeSet<&str> = targets
        .iter()
        .filter_map(|p| p.rsplit('.').next())
        .collect();
    if a.json {
        let v = serde_json::json!({
            "architecture": arch,
            "parameters": params,
            "linear_layers": targets,
            "target_names": names,
            "output_head": modules.iter().filter(|m| m.kind == ModuleKind::OutputHead).map(|m| &m.path).collect::<Vec<_>>(),
        });
        println!("{}", serde_json::to_string_pretty(&v)?);
    } else {
        println!("model:        {}", a.model.display());
        println!("architecture: {arch}");
        println!("parameters:   {params}");
        println!(
            "target names: {}",
            names.into_iter().collect::<Vec<_>>().join(", ")
        );
        println!("linear layers ({}):", targets.len());
        for t in targets {
            println!("  {t}");
        }
    }
    Ok(())
}
