/* config: one option table drives defaults, INI files, --flags, --help,
 * config_to_ini and range checks, so a key is added in exactly one place. */
#include "moesim/config.h"
#include "moesim/output.h"

#include <errno.h>
#include <getopt.h>
#include <ini.h>
#include <libgen.h>
#include <limits.h>
#include <math.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/stat.h>
#include <unistd.h>

typedef enum { OPT_INT, OPT_LONG, OPT_DOUBLE, OPT_BOOL, OPT_STRING } OptionType;

/* A number accepted outside an option's range because it means something
 * else, e.g. a capacity factor of 0 for dropless routing. */
typedef struct SpecialValue {
    double value;
    const char *meaning; /* completes "or 0 ...", e.g. "for dropless"; NULL ends the list */
} SpecialValue;

typedef struct Option {
    const char *name;  /* flag spelling without "--"; INI may use '_' */
    const char *group; /* heading in --help */
    OptionType type;
    size_t offset;            /* into Config */
    size_t size;              /* of the Config field; checked against type */
    double min, max;          /* numeric range */
    int min_open, max_open;   /* nonzero: the bound itself is excluded */
    SpecialValue special[2];  /* also accepted, outside the range */
    const char *default_text; /* parsed by config_defaults like user input */
    const char *choices;      /* strings only: "a|b|c", NULL for free text */
    int list;                 /* strings with choices: a comma list of them, "b,a" */
    const char *metavar;      /* --help placeholder when the type's is vague */
    int optional;             /* strings only: empty means "not used" */
    const char *help;
} Option;

#define MAX_SPECIAL (sizeof(((Option *)0)->special) / sizeof(SpecialValue))

#define FIELD(f) .offset = offsetof(Config, f), .size = sizeof(((Config *)0)->f)

#define G_MODEL "model"
#define G_MOE "mixture of experts"
#define G_TRAIN "training"
#define G_DATA "data"
#define G_OUT "output"
#define G_PLATFORM "platform"
#define G_BENCH "moesim bench"

/* Upper bounds are far beyond what this program can run; they exist to turn
 * a typo (an extra zero or two) into an error instead of an allocation of
 * terabytes. */
static const Option OPTIONS[] = {
    {.name = "num-layers",
     .group = G_MODEL,
     .type = OPT_INT,
     FIELD(num_layers),
     .min = 1,
     .max = 1024,
     .default_text = "4",
     .help = "transformer blocks"},
    {.name = "hidden-size",
     .group = G_MODEL,
     .type = OPT_INT,
     FIELD(hidden_size),
     .min = 1,
     .max = 65536,
     .default_text = "128",
     .help = "model width"},
    {.name = "num-attention-heads",
     .group = G_MODEL,
     .type = OPT_INT,
     FIELD(num_attention_heads),
     .min = 1,
     .max = 1024,
     .default_text = "4",
     .help = "attention heads; must divide hidden-size"},
    {.name = "ffn-hidden-size",
     .group = G_MODEL,
     .type = OPT_INT,
     FIELD(ffn_hidden_size),
     .min = 1,
     .max = 1 << 20,
     .default_text = "512",
     .help = "hidden width of the dense FFN layers"},
    {.name = "seq-length",
     .group = G_MODEL,
     .type = OPT_INT,
     FIELD(seq_length),
     .min = 1,
     .max = 1 << 17,
     .default_text = "128",
     .help = "tokens per sequence"},
    {.name = "dense",
     .group = G_MODEL,
     .type = OPT_BOOL,
     FIELD(dense),
     .min = 0,
     .max = 1,
     .default_text = "0",
     .help = "1: a dense baseline, no MoE layers: every FFN is a dense FFN of "
             "--ffn-hidden-size (give it k x --moe-ffn-hidden-size to match top-k's active "
             "FLOPs); the MoE keys are then unused. The same model as a --moe-layer-freq "
             "larger than --num-layers"},
    {.name = "untie-embeddings-and-output-weights",
     .group = G_MODEL,
     .type = OPT_BOOL,
     FIELD(untie_embeddings_and_output_weights),
     .min = 0,
     .max = 1,
     .default_text = "0",
     .help = "give the LM head its own weights instead of the token embedding"},
    {.name = "precision",
     .group = G_MODEL,
     .type = OPT_STRING,
     FIELD(precision),
     .default_text = "fp32",
     .choices = "fp32|bf16",
     .help = "matmul inputs (activations, weights, gradients) in float32 or bfloat16; "
             "accumulation, gradients and master weights stay float32 (Switch Transformer's "
             "recipe); bf16 runs as --bf16-gemm says. The "
             "router follows --moe-router-precision"},
    {.name = "moe-router-precision",
     .group = G_MODEL,
     .type = OPT_STRING,
     FIELD(moe_router_precision),
     .default_text = "fp32",
     .choices = "fp32|bf16",
     .help = "the router's matmuls (logits, noisy_topk noise, their backward): fp32 keeps "
             "Switch's selective precision under --precision bf16; bf16 with --precision "
             "fp32 puts only the router in bf16 (an ablation)"},

    {.name = "num-experts",
     .group = G_MOE,
     .type = OPT_INT,
     FIELD(num_experts),
     .min = 1,
     .max = 1024,
     .default_text = "8",
     .help = "experts per MoE layer"},
    {.name = "moe-router-topk",
     .group = G_MOE,
     .type = OPT_INT,
     FIELD(moe_router_topk),
     .min = 1,
     .max = 1024,
     .default_text = "2",
     .help = "experts each token is routed to"},
    {.name = "moe-layer-freq",
     .group = G_MOE,
     .type = OPT_INT,
     FIELD(moe_layer_freq),
     .min = 1,
     .max = 1025, /* one past --num-layers' bound: where --dense puts it */
     .default_text = "1",
     .help = "every n-th layer's FFN is an MoE layer (1 = all; larger than --num-layers: "
             "none, a dense model, see --dense)"},
    {.name = "moe-ffn-hidden-size",
     .group = G_MOE,
     .type = OPT_INT,
     FIELD(moe_ffn_hidden_size),
     .min = 1,
     .max = 1 << 20,
     .default_text = "256",
     .help = "hidden width of each expert"},
    {.name = "expert-model-parallel-size",
     .group = G_MOE,
     .type = OPT_INT,
     FIELD(expert_model_parallel_size),
     .min = 0,
     .max = 1 << 20,
     .default_text = "0",
     .help = "ranks that share one copy of the experts (EP); 0 = all ranks"},
    {.name = "moe-token-dispatcher-type",
     .group = G_MOE,
     .type = OPT_STRING,
     FIELD(moe_token_dispatcher_type),
     .default_text = "alltoall",
     .choices = "alltoall|hierarchical",
     .help = "how token rows reach their experts: alltoall (one exchange between every pair of "
             "ranks) | hierarchical (gathered per node, one exchange per pair of nodes, then "
             "scattered; results are bit-identical)"},
    {.name = "moe-overlap-chunks",
     .group = G_MOE,
     .type = OPT_INT,
     FIELD(moe_overlap_chunks),
     .min = 1,
     .max = 1 << 20,
     .default_text = "1",
     .help = "K > 1: each local expert's rows travel without blocking and expert work on "
             "arrived rows (in K chunks of local experts) hides the rest of the exchange; "
             "bit-identical results; alltoall dispatcher only"},
    {.name = "moe-expert-shadowing",
     .group = G_MOE,
     .type = OPT_BOOL,
     FIELD(moe_expert_shadowing),
     .min = 0,
     .max = 1,
     .default_text = "0",
     .help = "1: when a rank's experts get more rows than another's, the sources of some of "
             "those rows compute them with a copy of the expert's weights and send its "
             "gradient back, instead of sending the rows (FasterMoE's dynamic shadowing, planned "
             "per step from the exchanged counts); bit-identical results; alltoall dispatcher "
             "without --moe-overlap-chunks only"},
    {.name = "moe-shadow-min-rows",
     .group = G_MOE,
     .type = OPT_INT,
     FIELD(moe_shadow_min_rows),
     .min = 0,
     .max = 1 << 30,
     .default_text = "0",
     .help = "rows a shadow must take off the busiest rank; 0 = 32 x (1 + grains per rank): "
             "the rows whose compute matches moving the weights there and each grain's "
             "gradient back at 48 FLOPs per byte"},
    {.name = "overlap-grad-reduce",
     .group = G_MOE,
     .type = OPT_BOOL,
     FIELD(overlap_grad_reduce),
     .min = 0,
     .max = 1,
     .default_text = "0",
     .help = "1: reduce each layer's gradients (exactly, in buckets, without blocking) as soon "
             "as its backward is done, hidden behind the backward of the layers below; "
             "bit-identical results"},
    {.name = "ranks-per-node",
     .group = G_MOE,
     .type = OPT_INT,
     FIELD(ranks_per_node),
     .min = 0,
     .max = 1 << 20,
     .default_text = "0",
     .help = "ranks per node for the hierarchical exchange; 0 = the ranks that share memory "
             "(MPI_COMM_TYPE_SHARED); N treats ranks N*i .. N*i+N-1 as one node, to study a "
             "cluster on one host"},
    {.name = "moe-group-size",
     .group = G_MOE,
     .type = OPT_INT,
     FIELD(moe_group_size),
     .min = 0,
     .max = 1 << 30,
     .default_text = "0",
     .help = "tokens per routing group; 0 = one micro-batch"},
    {.name = "moe-router-norm-topk-prob",
     .group = G_MOE,
     .type = OPT_BOOL,
     FIELD(moe_router_norm_topk_prob),
     .min = 0,
     .max = 1,
     .default_text = "1",
     .help = "renormalise the k selected router probabilities to sum to 1"},
    {.name = "moe-expert-capacity-factor",
     .group = G_MOE,
     .type = OPT_DOUBLE,
     FIELD(moe_expert_capacity_factor),
     .min = 0,
     .min_open = 1,
     .max = 1000,
     .special = {{0, "for dropless (no capacity, nothing dropped)"}},
     .default_text = "1.25",
     .help = "expert capacity as a multiple of an even share; 0 = dropless (MegaBlocks)"},
    {.name = "moe-aux-loss-coeff",
     .group = G_MOE,
     .type = OPT_DOUBLE,
     FIELD(moe_aux_loss_coeff),
     .min = 0,
     .max = 100,
     .default_text = "0.01",
     .help = "weight of the load-balancing loss"},
    {.name = "moe-z-loss-coeff",
     .group = G_MOE,
     .type = OPT_DOUBLE,
     FIELD(moe_z_loss_coeff),
     .min = 0,
     .max = 100,
     .default_text = "0.001",
     .help = "weight of the router z-loss"},
    {.name = "moe-token-drop-policy",
     .group = G_MOE,
     .type = OPT_STRING,
     FIELD(moe_token_drop_policy),
     .default_text = "position",
     .choices = "position|probs",
     .help = "which tokens an over-full expert drops: the latest in the group (position) or "
             "those with the lowest router probability (probs)"},
    {.name = "moe-router-type",
     .group = G_MOE,
     .type = OPT_STRING,
     FIELD(moe_router_type),
     .default_text = "topk",
     .choices = "topk|switch|noisy_topk|gshard_top2|expert_choice|sinkhorn|soft",
     .metavar = "TYPE",
     .help = "topk (softmax, top-k) | switch (Switch Transformer: top-1 scaled by its "
             "probability) | noisy_topk (Shazeer 2017 noisy top-k gating) | gshard_top2 "
             "(GShard: random second expert) | expert_choice (Zhou 2022: experts pick tokens) | "
             "sinkhorn (Megatron: Sinkhorn-balanced selection in training) | soft (every token "
             "to every expert, weighted)"},
    {.name = "moe-router-pre-softmax",
     .group = G_MOE,
     .type = OPT_BOOL,
     FIELD(moe_router_pre_softmax),
     .min = 0,
     .max = 1,
     .default_text = "1",
     .help = "1: softmax over all experts, then top-k (renormalised by "
             "--moe-router-norm-topk-prob); 0: softmax over the k selected logits (Mixtral)"},
    {.name = "moe-router-score-function",
     .group = G_MOE,
     .type = OPT_STRING,
     FIELD(moe_router_score_function),
     .default_text = "softmax",
     .choices = "softmax|sigmoid",
     .help = "router scores: softmax over the experts, or an independent sigmoid per expert "
             "(DeepSeek-V3; topk router only)"},
    {.name = "moe-router-enable-expert-bias",
     .group = G_MOE,
     .type = OPT_BOOL,
     FIELD(moe_router_enable_expert_bias),
     .min = 0,
     .max = 1,
     .default_text = "0",
     .help = "DeepSeek-V3 aux-loss-free balancing: a per-expert bias used for selection only "
             "(topk router)"},
    {.name = "moe-router-bias-update-rate",
     .group = G_MOE,
     .type = OPT_DOUBLE,
     FIELD(moe_router_bias_update_rate),
     .min = 0,
     .max = 1,
     .default_text = "1e-3",
     .help = "step of the expert-bias update towards even load (DeepSeek-V3's and "
             "Megatron's 1e-3); used with --moe-router-enable-expert-bias"},
    {.name = "moe-input-jitter-eps",
     .group = G_MOE,
     .type = OPT_DOUBLE,
     FIELD(moe_input_jitter_eps),
     .min = 0,
     .max = 1,
     .max_open = 1,
     .default_text = "0",
     .help = "ST-MoE jitter: the router input is multiplied by U(1-eps, 1+eps) in training; "
             "0 = none"},
    {.name = "moe-eval-capacity-factor",
     .group = G_MOE,
     .type = OPT_DOUBLE,
     FIELD(moe_eval_capacity_factor),
     .min = 0,
     .min_open = 1,
     .max = 1000,
     .special = {{-1, "for the training factor"}, {0, "for dropless"}},
     .default_text = "-1",
     .help = "expert capacity factor at evaluation; -1 = the training factor, 0 = dropless"},
    {.name = "moe-min-capacity",
     .group = G_MOE,
     .type = OPT_INT,
     FIELD(moe_min_capacity),
     .min = 0,
     .max = 1 << 30,
     .default_text = "4",
     .help = "floor on each expert's capacity per routing group (DeepSpeed's min_capacity)"},
    {.name = "moe-router-load-balancing-type",
     .group = G_MOE,
     .type = OPT_STRING,
     FIELD(moe_router_load_balancing_type),
     .default_text = "aux_loss",
     .choices = "aux_loss|seq_aux_loss|global_aux_loss|none",
     .metavar = "TYPE",
     .help = "what --moe-aux-loss-coeff balances: aux_loss (each routing group, Switch) | "
             "seq_aux_loss (each sequence) | global_aux_loss (the global batch) | none (no "
             "balancing loss)"},
    {.name = "moe-importance-loss-coeff",
     .group = G_MOE,
     .type = OPT_DOUBLE,
     FIELD(moe_importance_loss_coeff),
     .min = 0,
     .max = 100,
     .default_text = "0",
     .help = "weight of Shazeer 2017's importance loss (CV^2 of each expert's summed gates; "
             "with --moe-hierarchical-groups and noisy_topk the paper's Importance_H)"},
    {.name = "moe-load-loss-coeff",
     .group = G_MOE,
     .type = OPT_DOUBLE,
     FIELD(moe_load_loss_coeff),
     .min = 0,
     .max = 100,
     .default_text = "0",
     .help = "weight of Shazeer 2017's load loss (CV^2 of the smooth load estimate; "
             "noisy_topk only; with --moe-hierarchical-groups the paper's hierarchical "
             "Load_H)"},
    {.name = "moe-expert-activation",
     .group = G_MOE,
     .type = OPT_STRING,
     FIELD(moe_expert_activation),
     .default_text = "gelu",
     .choices = "gelu|swiglu",
     .help = "activation inside each expert; swiglu adds a gate projection"},
    {.name = "moe-shared-expert-intermediate-size",
     .group = G_MOE,
     .type = OPT_INT,
     FIELD(moe_shared_expert_intermediate_size),
     .min = 0,
     .max = 1 << 20,
     .default_text = "0",
     .help = "hidden width of a shared expert every token also passes through; 0 = none"},
    {.name = "moe-expert-dropout",
     .group = G_MOE,
     .type = OPT_DOUBLE,
     FIELD(moe_expert_dropout),
     .min = 0,
     .max = 1,
     .max_open = 1,
     .default_text = "0",
     .help = "dropout on each expert's hidden units in training (Switch's expert dropout, "
             "0.4 in its fine-tuning); the mask is a function of the seed, step, layer, "
             "expert and token, so every layout drops the same units; 0 = none"},
    {.name = "init-method-std",
     .group = G_MOE,
     .type = OPT_DOUBLE,
     FIELD(init_method_std),
     .min = 0,
     .min_open = 1,
     .max = 1,
     .default_text = "0.02",
     .help = "standard deviation of every normally initialised weight matrix (Megatron's "
             "name): embeddings, attention, router, dense, expert and shared-expert FFNs, LM "
             "head; residual projections get it / sqrt(2 x layers). Switch's reduced "
             "initialisation (scale s = 0.1, std = sqrt(s / fan-in)) is this times sqrt(0.1): "
             "0.0063"},
    {.name = "moe-router-num-groups",
     .group = G_MOE,
     .type = OPT_INT,
     FIELD(moe_router_num_groups),
     .min = 0,
     .max = 1 << 20,
     .default_text = "0",
     .help = "group-limited routing (DeepSeek-V3, Megatron's name): split the experts into "
             "this many groups of consecutive experts (= EP ranks or nodes, which then bounds "
             "the ranks or nodes a token's rows reach); 0 = off. Needs "
             "--moe-router-group-topk"},
    {.name = "moe-router-group-topk",
     .group = G_MOE,
     .type = OPT_INT,
     FIELD(moe_router_group_topk),
     .min = 0,
     .max = 1 << 20,
     .default_text = "0",
     .help = "groups each token may route to: the best by the sum of their top "
             "(k / group-topk) expert scores; the token's k experts come from these groups"},
    {.name = "moe-hierarchical-groups",
     .group = G_MOE,
     .type = OPT_INT,
     FIELD(moe_hierarchical_groups),
     .min = 0,
     .max = 1 << 20,
     .default_text = "0",
     .help = "two-level hierarchical MoE (Shazeer et al. 2017, appendix B): a primary router "
             "(layers.N.router_group_w, one row per group) picks among this many groups of E / "
             "groups consecutive experts, then the group's rows of router_w pick experts "
             "within it; expert (i,j) scores softmax(primary)_i x softmax(group "
             "i)_j. --moe-router-topk is the experts per token, k / group-topk from each "
             "chosen group. topk, switch and noisy_topk routers only; with noisy_topk both "
             "levels are noisy (layers.N.router_group_noise_w) and --moe-load-loss-coeff is "
             "the paper's hierarchical Load_H; 0 = off"},
    {.name = "moe-hierarchical-group-topk",
     .group = G_MOE,
     .type = OPT_INT,
     FIELD(moe_hierarchical_group_topk),
     .min = 1,
     .max = 1 << 20,
     .default_text = "1",
     .help = "groups the hierarchical primary router picks per token (k_1; the paper's "
             "experiments use 1); it must divide the top-k"},

    {.name = "micro-batch-size",
     .group = G_TRAIN,
     .type = OPT_INT,
     FIELD(micro_batch_size),
     .min = 1,
     .max = 65536,
     .default_text = "16",
     .help = "sequences per rank per step"},
    {.name = "train-iters",
     .group = G_TRAIN,
     .type = OPT_INT,
     FIELD(train_iters),
     .min = 1,
     .max = 1e9,
     .default_text = "500",
     .help = "optimizer steps"},
    {.name = "lr-warmup-iters",
     .group = G_TRAIN,
     .type = OPT_INT,
     FIELD(lr_warmup_iters),
     .min = 0,
     .max = 1e9,
     .default_text = "50",
     .help = "steps of linear warm-up to --lr; one you give must be shorter than "
             "--train-iters (the default gives way: a run shorter than it never reaches --lr)"},
    {.name = "eval-interval",
     .group = G_TRAIN,
     .type = OPT_INT,
     FIELD(eval_interval),
     .min = 1,
     .max = 1e9,
     .default_text = "100",
     .help = "steps between validations"},
    {.name = "eval-iters",
     .group = G_TRAIN,
     .type = OPT_INT,
     FIELD(eval_iters),
     .min = 1,
     .max = 1e6,
     .default_text = "8",
     .help = "micro-batches per validation"},
    {.name = "log-interval",
     .group = G_TRAIN,
     .type = OPT_INT,
     FIELD(log_interval),
     .min = 1,
     .max = 1e9,
     .default_text = "1",
     .help = "steps between stats records"},
    {.name = "record-group-counts-interval",
     .group = G_TRAIN,
     .type = OPT_INT,
     FIELD(record_group_counts_interval),
     .min = 0,
     .max = 1e9,
     .default_text = "1",
     .help = "steps between /routing/group_expert_counts rows, the kept assignments per "
             "(routing group, expert) that `moesim project` replays on other layouts; 0 = never"},
    {.name = "progress-interval",
     .group = G_TRAIN,
     .type = OPT_INT,
     FIELD(progress_interval),
     .min = 1,
     .max = 1e9,
     .default_text = "10",
     .help = "steps between progress lines"},
    {.name = "lr",
     .group = G_TRAIN,
     .type = OPT_DOUBLE,
     FIELD(lr),
     .min = 0,
     .min_open = 1,
     .max = 10,
     .default_text = "3e-3",
     .help = "peak learning rate"},
    {.name = "min-lr",
     .group = G_TRAIN,
     .type = OPT_DOUBLE,
     FIELD(min_lr),
     .min = 0,
     .max = 10,
     .default_text = "3e-4",
     .help = "learning rate at the end of the decay"},
    {.name = "weight-decay",
     .group = G_TRAIN,
     .type = OPT_DOUBLE,
     FIELD(weight_decay),
     .min = 0,
     .max = 10,
     .default_text = "0.1",
     .help = "AdamW weight decay"},
    {.name = "clip-grad",
     .group = G_TRAIN,
     .type = OPT_DOUBLE,
     FIELD(clip_grad),
     .min = 0,
     .max = 1e6,
     .default_text = "1.0",
     .help = "global gradient-norm clip; 0 disables"},
    {.name = "skip-nonfinite-steps",
     .group = G_TRAIN,
     .type = OPT_INT,
     FIELD(skip_nonfinite_steps),
     .min = 0,
     .max = 1e9,
     .default_text = "0",
     .help = "steps whose loss or gradient is NaN/Inf to skip (recorded, no update) before "
             "the run stops as diverged; 0 = stop at the first"},
    {.name = "adam-beta1",
     .group = G_TRAIN,
     .type = OPT_DOUBLE,
     FIELD(adam_beta1),
     .min = 0,
     .max = 1,
     .max_open = 1,
     .default_text = "0.9",
     .help = "Adam first-moment decay"},
    {.name = "adam-beta2",
     .group = G_TRAIN,
     .type = OPT_DOUBLE,
     FIELD(adam_beta2),
     .min = 0,
     .max = 1,
     .max_open = 1,
     .default_text = "0.95",
     .help = "Adam second-moment decay"},
    {.name = "adam-eps",
     .group = G_TRAIN,
     .type = OPT_DOUBLE,
     FIELD(adam_eps),
     .min = 0,
     .min_open = 1,
     .max = 1,
     .default_text = "1e-8",
     .help = "Adam denominator epsilon"},
    {.name = "seed",
     .group = G_TRAIN,
     .type = OPT_LONG,
     FIELD(seed),
     .min = 0,
     .max = 4294967295.0,
     .default_text = "1234",
     .help = "seed for weights and data order"},
    {.name = "freeze",
     .group = G_TRAIN,
     .type = OPT_STRING,
     FIELD(freeze),
     .default_text = "",
     .choices = "attention|router|experts|non-moe|moe",
     .list = 1,
     .metavar = "GROUP[,GROUP]",
     .optional = 1,
     .help = "parameters AdamW leaves alone (no update, no weight decay, Adam moments kept): "
             "attention (its norm, qkv, proj), router (router and noise weights, expert "
             "biases), experts (routed and shared), non-moe (all but router and experts), moe "
             "(router and experts); the clipping norm is over the trainable gradients; empty = "
             "none (ST-MoE's fine-tuning study)"},

    {.name = "data-path",
     .group = G_DATA,
     .type = OPT_STRING,
     FIELD(data_path),
     .default_text = "/usr/share/games/fortunes",
     .metavar = "PATH",
     .help = "text file, directory of text files, .tok file, or \"synthetic\""},
    {.name = "data-format",
     .group = G_DATA,
     .type = OPT_STRING,
     FIELD(data_format),
     .default_text = "auto",
     .choices = "auto|text|tokens|synthetic",
     .help = "how to read data-path; auto guesses"},
    {.name = "val-fraction",
     .group = G_DATA,
     .type = OPT_DOUBLE,
     FIELD(val_fraction),
     .min = 0,
     .min_open = 1,
     .max = 0.5,
     .default_text = "0.1",
     .help = "share of the data held out for validation"},
    {.name = "synthetic-clusters",
     .group = G_DATA,
     .type = OPT_INT,
     FIELD(synthetic_clusters),
     .min = 1,
     .max = 256,
     .default_text = "8",
     .help = "token clusters in the synthetic source"},
    {.name = "synthetic-tokens",
     .group = G_DATA,
     .type = OPT_LONG,
     FIELD(synthetic_tokens),
     .min = 1000,
     .max = 1e9,
     .default_text = "1000000",
     .help = "length of the synthetic source"},

    {.name = "out",
     .group = G_OUT,
     .type = OPT_STRING,
     FIELD(out),
     .default_text = "runs/moesim.h5",
     .metavar = "PATH",
     .help = "HDF5 file for stats and the resolved config; its directory is created when "
             "missing"},
    {.name = "overwrite",
     .group = G_OUT,
     .type = OPT_BOOL,
     FIELD(overwrite),
     .min = 0,
     .max = 1,
     .default_text = "0",
     .help = "replace an existing file at --out; without it such a run is refused"},
    {.name = "record-flush-interval",
     .group = G_OUT,
     .type = OPT_INT,
     FIELD(record_flush_interval),
     .min = 1,
     .max = 1 << 30,
     .default_text = "10",
     .help = "steps between writes of the buffered record to disk (a killed run keeps these)"},
    {.name = "save",
     .group = G_OUT,
     .type = OPT_STRING,
     FIELD(save),
     .default_text = "",
     .metavar = "DIR",
     .optional = 1,
     .help = "checkpoint directory: DIR/iter_NNNNNNN.h5 (parameters, Adam moments, step, expert "
             "biases; experts in global order, so any layout loads them) every --save-interval "
             "steps and at the end, DIR/latest_checkpointed_iteration.txt names the newest; empty "
             "= none"},
    {.name = "save-interval",
     .group = G_OUT,
     .type = OPT_INT,
     FIELD(save_interval),
     .min = 0,
     .max = 1 << 30,
     .default_text = "0",
     .help = "steps between checkpoints; 0 = only the final one"},
    {.name = "save-keep",
     .group = G_OUT,
     .type = OPT_INT,
     FIELD(save_keep),
     .min = 0,
     .max = 1 << 30,
     .default_text = "0",
     .help = "checkpoints kept in --save, the newest; 0 = all"},
    {.name = "load",
     .group = G_OUT,
     .type = OPT_STRING,
     FIELD(load),
     .default_text = "",
     .metavar = "DIR",
     .optional = 1,
     .help = "resume from DIR's latest checkpoint on any world size and expert-parallel size: "
             "parameters, optimizer, step, schedule and data position; the record at --out "
             "continues from that step; empty = start fresh"},
    {.name = "finetune",
     .group = G_OUT,
     .type = OPT_BOOL,
     FIELD(finetune),
     .min = 0,
     .max = 1,
     .default_text = "0",
     .help = "with --load: take the parameters only and start a new run at step 0 with a fresh "
             "optimizer and a new record (Megatron's --finetune)"},
    {.name = "no-load-optim",
     .group = G_OUT,
     .type = OPT_BOOL,
     FIELD(no_load_optim),
     .min = 0,
     .max = 1,
     .default_text = "0",
     .help = "with --load: keep the checkpoint's parameters and step but start the Adam moments "
             "from zero (Megatron's --no-load-optim)"},

    {.name = "flush-denormals",
     .group = G_PLATFORM,
     .type = OPT_BOOL,
     FIELD(flush_denormals),
     .min = 0,
     .max = 1,
     .default_text = "1",
     .help = "flush float32 denormals to zero (FTZ+DAZ) on every rank; 0 keeps IEEE denormals, "
             "which are very slow on some CPUs"},
    {.name = "bf16-gemm",
     .group = G_PLATFORM,
     .type = OPT_STRING,
     FIELD(bf16_gemm),
     .default_text = "auto",
     .choices = "auto|onednn|emulated",
     .help = "how bf16 matmuls run: onednn is oneDNN's native bf16 GEMM (CPUs with avx512_bf16 "
             "or amx_bf16; refused elsewhere), emulated rounds the inputs to bf16 and runs "
             "sgemm, auto takes onednn where it runs natively, else emulated. The same numbers "
             "up to accumulation order"},

    {.name = "bench-warmup-iters",
     .group = G_BENCH,
     .type = OPT_INT,
     FIELD(bench_warmup_iters),
     .min = 0,
     .max = 1e6,
     .default_text = "2",
     .help = "training steps moesim bench runs before it measures. The first steps are "
             "slow (allocation, cold caches), and an untrained router is far from balanced: "
             "it drops many rows at capacity and loads one rank more. Some 50 steps give the "
             "steady state of a training run"},
    {.name = "bench-iters",
     .group = G_BENCH,
     .type = OPT_INT,
     FIELD(bench_iters),
     .min = 1,
     .max = 1e6,
     .default_text = "5",
     .help = "training steps moesim bench measures, after --bench-warmup-iters"},
};

#define NUM_OPTIONS (sizeof(OPTIONS) / sizeof(OPTIONS[0]))
_Static_assert(NUM_OPTIONS <= CONFIG_MAX_KEYS, "raise CONFIG_MAX_KEYS in config.h");

/* Longest key we compare; longer input cannot be a key. */
#define KEY_MAX 64

/* --------------------------------------------------------------------------
 * Messages */

/* Every error path ends here, so a failure always leaves a message. */
static int fail(char *err, size_t errlen, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));

static int fail(char *err, size_t errlen, const char *fmt, ...) {
    if (err && errlen > 0) {
        va_list ap;
        va_start(ap, fmt);
        vsnprintf(err, errlen, fmt, ap);
        va_end(ap);
    }
    return -1;
}

static void normalise_key(char *dst, const char *key) {
    size_t i = 0;
    for (; key[i] && i + 1 < KEY_MAX; i++) dst[i] = key[i] == '_' ? '-' : key[i];
    dst[i] = '\0';
}

static size_t min3(size_t a, size_t b, size_t c) {
    size_t m = a < b ? a : b;
    return m < c ? m : c;
}

static size_t levenshtein(const char *a, const char *b) {
    size_t la = strlen(a), lb = strlen(b);
    size_t prev[KEY_MAX + 1], cur[KEY_MAX + 1];
    if (la > KEY_MAX || lb > KEY_MAX) return (size_t)-1;
    for (size_t j = 0; j <= lb; j++) prev[j] = j;
    for (size_t i = 1; i <= la; i++) {
        cur[0] = i;
        for (size_t j = 1; j <= lb; j++) {
            size_t substitution = prev[j - 1] + (a[i - 1] != b[j - 1]);
            cur[j] = min3(prev[j] + 1, cur[j - 1] + 1, substitution);
        }
        memcpy(prev, cur, (lb + 1) * sizeof(prev[0]));
    }
    return prev[lb];
}

/* Keeps candidate as *best when it is nearer to key than any before it.
 * Start *best_distance at strlen(key): a suggestion that rewrites every
 * character shares nothing with the input and only confuses. */
static void keep_nearer(const char *key, const char *candidate, const char **best,
                        size_t *best_distance) {
    size_t distance = levenshtein(key, candidate);
    if (distance < *best_distance) {
        *best = candidate;
        *best_distance = distance;
    }
}

/* The nearest key, or NULL when none is near. */
static const char *nearest_name(const char *input, const char *extra_name) {
    char key[KEY_MAX];
    normalise_key(key, input);
    const char *best = NULL;
    size_t best_distance = strlen(key);
    for (size_t i = 0; i < NUM_OPTIONS; i++)
        keep_nearer(key, OPTIONS[i].name, &best, &best_distance);
    if (extra_name) keep_nearer(key, extra_name, &best, &best_distance);
    return best;
}

/* `unknown key "x"; did you mean "y"? (...)`. typed is echoed as given;
 * dash_prefix is "--" when the suggestion should be written as a flag. */
static int fail_unknown_key(char *err, size_t errlen, const char *where, const char *what,
                            const char *typed, const char *dash_prefix, const char *extra_name) {
    const char *key = typed + strspn(typed, "-");
    const char *suggestion = nearest_name(key, extra_name);
    if (suggestion)
        return fail(err, errlen,
                    "%sunknown %s \"%s\"; did you mean \"%s%s\"? (moesim --help lists every key)",
                    where, what, typed, dash_prefix, suggestion);
    return fail(err, errlen, "%sunknown %s \"%s\" (moesim --help lists every key)", where, what,
                typed);
}

/* --------------------------------------------------------------------------
 * Table lookups and values */

static const Option *find_option(const char *key) {
    char normalised[KEY_MAX];
    if (strlen(key) >= KEY_MAX) return NULL;
    normalise_key(normalised, key);
    for (size_t i = 0; i < NUM_OPTIONS; i++)
        if (strcmp(OPTIONS[i].name, normalised) == 0) return &OPTIONS[i];
    return NULL;
}

static void *field_of(Config *cfg, const Option *opt) {
    return (char *)cfg + opt->offset;
}

static const void *const_field_of(const Config *cfg, const Option *opt) {
    return (const char *)cfg + opt->offset;
}

static void format_bound(char *buf, size_t len, const Option *opt, double bound) {
    if (opt->type == OPT_DOUBLE)
        snprintf(buf, len, "%g", bound);
    else
        snprintf(buf, len, "%.0f", bound);
}

static int is_special_value(const Option *opt, double value) {
    for (size_t i = 0; i < MAX_SPECIAL && opt->special[i].meaning; i++)
        if (value == opt->special[i].value) return 1;
    return 0;
}

/* ", or 0 for dropless" for each special value; "" when there are none. */
static void format_special_values(char *buf, size_t len, const Option *opt) {
    size_t used = 0;
    buf[0] = '\0';
    for (size_t i = 0; i < MAX_SPECIAL && opt->special[i].meaning && used < len; i++)
        used += (size_t)snprintf(buf + used, len - used, ", or %g %s", opt->special[i].value,
                                 opt->special[i].meaning);
}

/* Names only the violated bound: "must be > 0" says exactly what to change. */
static int check_range(const Option *opt, double value, const char *text, const char *prefix,
                       char *err, size_t errlen) {
    if (is_special_value(opt, value)) return 0;
    int below = value < opt->min || (opt->min_open && value == opt->min);
    int above = value > opt->max || (opt->max_open && value == opt->max);
    if (!below && !above) return 0;
    char bound[64], special[256];
    format_bound(bound, sizeof(bound), opt, below ? opt->min : opt->max);
    format_special_values(special, sizeof(special), opt);
    const char *relation = below ? (opt->min_open ? ">" : ">=") : (opt->max_open ? "<" : "<=");
    return fail(err, errlen, "%s%s: %s is out of range; it must be %s %s%s", prefix, opt->name,
                text, relation, bound, special);
}

static int parse_integer(const Option *opt, const char *text, const char *prefix, long long *out,
                         char *err, size_t errlen) {
    char *end = NULL;
    errno = 0;
    long long value = strtoll(text, &end, 10);
    if (end == text || *end != '\0')
        return fail(err, errlen, "%s%s: \"%s\" is not an integer; give a whole number such as %s",
                    prefix, opt->name, text, opt->default_text);
    /* strtoll clamps on overflow, which the range check then reports. */
    if (check_range(opt, (double)value, text, prefix, err, errlen) != 0) return -1;
    *out = value;
    return 0;
}

static int parse_double(const Option *opt, const char *text, const char *prefix, double *out,
                        char *err, size_t errlen) {
    char *end = NULL;
    double value = strtod(text, &end);
    if (end == text || *end != '\0' || !isfinite(value))
        return fail(err, errlen, "%s%s: \"%s\" is not a finite number; give a number such as %s",
                    prefix, opt->name, text, opt->default_text);
    if (check_range(opt, value, text, prefix, err, errlen) != 0) return -1;
    *out = value;
    return 0;
}

static int parse_bool(const Option *opt, const char *text, const char *prefix, int *out, char *err,
                      size_t errlen) {
    static const char *const truthy[] = {"1", "true", "yes", "on"};
    static const char *const falsy[] = {"0", "false", "no", "off"};
    for (size_t i = 0; i < 4; i++) {
        if (strcasecmp(text, truthy[i]) == 0) {
            *out = 1;
            return 0;
        }
        if (strcasecmp(text, falsy[i]) == 0) {
            *out = 0;
            return 0;
        }
    }
    return fail(err, errlen,
                "%s%s: \"%s\" is not a boolean; give 1/0, true/false, yes/no or on/off", prefix,
                opt->name, text);
}

/* Copies the next choice of "a|b|c" at *cursor into choice and steps past
 * it; returns 0 at the end of the list. */
static int next_choice(const char **cursor, char choice[KEY_MAX]) {
    if (**cursor == '\0') return 0;
    size_t len = strcspn(*cursor, "|");
    size_t kept = len < KEY_MAX ? len : KEY_MAX - 1;
    memcpy(choice, *cursor, kept);
    choice[kept] = '\0';
    *cursor += len + ((*cursor)[len] == '|');
    return 1;
}

static int is_choice(const char *choices, const char *text) {
    char choice[KEY_MAX];
    for (const char *c = choices; next_choice(&c, choice);)
        if (strcmp(choice, text) == 0) return 1;
    return 0;
}

/* The choice nearest to text, copied into best; 0 when none is near. */
static int nearest_choice(const char *choices, const char *text, char best[KEY_MAX]) {
    char choice[KEY_MAX];
    size_t best_distance = strlen(text);
    best[0] = '\0';
    for (const char *c = choices; next_choice(&c, choice);) {
        const char *nearer = NULL;
        keep_nearer(text, choice, &nearer, &best_distance);
        if (nearer) memcpy(best, choice, KEY_MAX);
    }
    return best[0] != '\0';
}

static int fail_choice(const Option *opt, const char *text, const char *prefix, char *err,
                       size_t errlen) {
    const char *one_of = opt->list ? "a comma list of" : "one of";
    char nearest[KEY_MAX];
    if (nearest_choice(opt->choices, text, nearest))
        return fail(err, errlen, "%s%s: \"%s\" is not a valid choice; did you mean \"%s\"? (%s %s)",
                    prefix, opt->name, text, nearest, one_of, opt->choices);
    return fail(err, errlen, "%s%s: \"%s\" is not a valid choice; use %s %s", prefix, opt->name,
                text, one_of, opt->choices);
}

/* Every item of the comma list text is one of opt->choices; repeats are
 * harmless ("moe,router"), empty items are typos. */
static int check_choice_list(const Option *opt, const char *text, const char *prefix, char *err,
                             size_t errlen) {
    for (const char *item = text;; item++) {
        size_t len = strcspn(item, ",");
        if (len == 0)
            return fail(err, errlen,
                        "%s%s: \"%s\" has an empty item; give a comma list of %s with no stray "
                        "commas",
                        prefix, opt->name, text, opt->choices);
        char choice[KEY_MAX];
        size_t kept = len < KEY_MAX ? len : KEY_MAX - 1;
        memcpy(choice, item, kept);
        choice[kept] = '\0';
        if (len >= KEY_MAX || !is_choice(opt->choices, choice))
            return fail_choice(opt, choice, prefix, err, errlen);
        item += len;
        if (*item == '\0') return 0;
    }
}

static int parse_string(const Option *opt, const char *text, const char *prefix, char *out,
                        char *err, size_t errlen) {
    if (text[0] == '\0' && !opt->optional)
        return fail(err, errlen, "%s%s: the value is empty; give one such as %s", prefix, opt->name,
                    opt->default_text);
    if (opt->list) {
        if (text[0] != '\0' && check_choice_list(opt, text, prefix, err, errlen) != 0) return -1;
    } else if (opt->choices && !is_choice(opt->choices, text)) {
        return fail_choice(opt, text, prefix, err, errlen);
    }
    size_t len = strlen(text);
    if (len >= opt->size)
        return fail(err, errlen, "%s%s: the value is %zu characters long; the limit is %zu", prefix,
                    opt->name, len, opt->size - 1);
    memcpy(out, text, len + 1);
    return 0;
}

/* Parses text for one option and stores it. prefix is "--" when the user
 * typed a flag, "" for INI keys, so the message echoes their spelling. */
static int apply_value(Config *cfg, const Option *opt, const char *text, const char *prefix,
                       char *err, size_t errlen) {
    void *field = field_of(cfg, opt);
    long long integer = 0;
    switch (opt->type) {
        case OPT_INT:
            if (parse_integer(opt, text, prefix, &integer, err, errlen) != 0) return -1;
            *(int *)field = (int)integer;
            return 0;
        case OPT_LONG:
            if (parse_integer(opt, text, prefix, &integer, err, errlen) != 0) return -1;
            *(long *)field = (long)integer;
            return 0;
        case OPT_DOUBLE:
            return parse_double(opt, text, prefix, (double *)field, err, errlen);
        case OPT_BOOL:
            return parse_bool(opt, text, prefix, (int *)field, err, errlen);
        case OPT_STRING:
            return parse_string(opt, text, prefix, (char *)field, err, errlen);
    }
    return fail(err, errlen, "%s%s: internal error: unknown option type", prefix, opt->name);
}

/* apply_value for what the user wrote (a flag, an INI line, config_set),
 * remembered so validation can tell a given value from a default. */
static int apply_given(Config *cfg, const Option *opt, const char *text, const char *prefix,
                       char *err, size_t errlen) {
    if (apply_value(cfg, opt, text, prefix, err, errlen) != 0) return -1;
    cfg->given[opt - OPTIONS] = 1;
    return 0;
}

/* Shortest text that parses back to the same double: "0.1" rather than
 * "0.10000000000000001", while %.17g guarantees the round trip at worst. */
static void format_double(char *buf, size_t len, double value) {
    for (int precision = 15; precision < 17; precision++) {
        snprintf(buf, len, "%.*g", precision, value);
        if (strtod(buf, NULL) == value) return;
    }
    snprintf(buf, len, "%.17g", value);
}

static void format_value(char *buf, size_t len, const Config *cfg, const Option *opt) {
    const void *field = const_field_of(cfg, opt);
    switch (opt->type) {
        case OPT_INT:
        case OPT_BOOL:
            snprintf(buf, len, "%d", *(const int *)field);
            return;
        case OPT_LONG:
            snprintf(buf, len, "%ld", *(const long *)field);
            return;
        case OPT_DOUBLE:
            format_double(buf, len, *(const double *)field);
            return;
        case OPT_STRING:
            snprintf(buf, len, "%s", (const char *)field);
            return;
    }
}

int config_set(Config *cfg, const char *key, const char *value, char *err, size_t errlen) {
    const Option *opt = find_option(key);
    if (!opt) return fail_unknown_key(err, errlen, "", "key", key, "", NULL);
    return apply_given(cfg, opt, value, "--", err, errlen);
}

int config_key_given(const Config *cfg, const char *key) {
    const Option *opt = find_option(key);
    return opt && cfg->given[opt - OPTIONS];
}

/* --------------------------------------------------------------------------
 * Defaults */

/* A mismatch here is a table typo that would corrupt Config silently. */
static int field_size_matches(const Option *opt) {
    switch (opt->type) {
        case OPT_INT:
        case OPT_BOOL:
            return opt->size == sizeof(int) && opt->min >= INT_MIN && opt->max <= INT_MAX;
        case OPT_LONG:
            return opt->size == sizeof(long);
        case OPT_DOUBLE:
            return opt->size == sizeof(double);
        case OPT_STRING:
            return opt->size > 1;
    }
    return 0;
}

void config_defaults(Config *cfg) {
    memset(cfg, 0, sizeof(*cfg));
    for (size_t i = 0; i < NUM_OPTIONS; i++) {
        char err[MOESIM_ERR_MAX];
        const Option *opt = &OPTIONS[i];
        if (!field_size_matches(opt)) {
            fprintf(stderr, "moesim: internal error: option %s does not match its Config field\n",
                    opt->name);
            abort();
        }
        if (apply_value(cfg, opt, opt->default_text, "--", err, sizeof(err)) != 0) {
            fprintf(stderr, "moesim: internal error: bad default: %s\n", err);
            abort();
        }
    }
}

/* --------------------------------------------------------------------------
 * INI files */

typedef struct IniState {
    Config *cfg;
    const char *path;
    FILE *file;
    int line;           /* line the parser is on, counted by our reader */
    int previous_ended; /* the last chunk read finished its line */
    int error_line;     /* first line with an error we reported, 0 if none */
    char *err;
    size_t errlen;
} IniState;

/* inih counts the lines it parses but only passes that count to handlers
 * when built with INI_HANDLER_LINENO, which distributions do not do; reading
 * through this wrapper keeps our own count. It also catches lines longer
 * than inih's buffer, which inih would otherwise split or drop. */
static char *ini_read_line(char *buf, int size, void *stream) {
    IniState *state = stream;
    if (!fgets(buf, size, state->file)) return NULL;
    if (state->previous_ended) state->line++;
    size_t len = strlen(buf);
    state->previous_ended = len > 0 && buf[len - 1] == '\n';
    if (!state->previous_ended && (int)len == size - 1 && !state->error_line) {
        state->error_line = state->line;
        fail(state->err, state->errlen,
             "%s:%d: the line is longer than %d characters, the most libinih reads; "
             "shorten it or give that key as a --flag instead",
             state->path, state->line, size - 3);
    }
    return buf;
}

/* Sections are accepted for readability and ignored: keys are global. */
static int ini_handle_key(void *user, const char *section, const char *name, const char *value) {
    (void)section;
    IniState *state = user;
    if (state->error_line) return 0;
    if (!value) value = "";
    char where[MOESIM_PATH_MAX + 32];
    snprintf(where, sizeof(where), "%s:%d: ", state->path, state->line);
    const Option *opt = find_option(name);
    int rc = opt ? apply_given(state->cfg, opt, value, where, state->err, state->errlen)
                 : fail_unknown_key(state->err, state->errlen, where, "key", name, "", NULL);
    if (rc != 0) {
        state->error_line = state->line;
        return 0;
    }
    return 1;
}

static int apply_ini_file(Config *cfg, const char *path, char *err, size_t errlen) {
    IniState state = {.cfg = cfg, .path = path, .previous_ended = 1, .err = err, .errlen = errlen};
    state.file = fopen(path, "r");
    if (!state.file)
        return fail(err, errlen, "cannot read config file %s: %s; check the path", path,
                    strerror(errno));
    int first_error_line = ini_parse_stream(ini_read_line, &state, ini_handle_key, &state);
    int read_errno = ferror(state.file) ? errno : 0;
    fclose(state.file);
    if (read_errno)
        return fail(err, errlen, "cannot read config file %s: %s; check the path", path,
                    strerror(read_errno));
    if (first_error_line < 0)
        return fail(err, errlen, "cannot parse config file %s: libinih error %d", path,
                    first_error_line);
    /* inih reports the first bad line; ours is the first line whose value we
     * rejected. A syntax error earlier in the file comes first. */
    if (first_error_line > 0 && (!state.error_line || first_error_line < state.error_line))
        return fail(err, errlen,
                    "%s:%d: syntax error; each line must be \"key = value\", a [section] "
                    "or a ; comment",
                    path, first_error_line);
    return state.error_line ? -1 : 0;
}

/* --------------------------------------------------------------------------
 * Command line */

/* getopt_long values: one per table row, then --config. Offset past the
 * character range so they never collide with '?' or ':'. */
#define OPTION_VAL_BASE 256
#define CONFIG_VAL (OPTION_VAL_BASE + (int)NUM_OPTIONS)

typedef struct FlagValue {
    const Option *opt;
    const char *value;
} FlagValue;

static void build_long_options(struct option *longopts) {
    for (size_t i = 0; i < NUM_OPTIONS; i++) {
        int has_arg = OPTIONS[i].type == OPT_BOOL ? optional_argument : required_argument;
        longopts[i] = (struct option){OPTIONS[i].name, has_arg, NULL, OPTION_VAL_BASE + (int)i};
    }
    longopts[NUM_OPTIONS] = (struct option){"config", required_argument, NULL, CONFIG_VAL};
    longopts[NUM_OPTIONS + 1] = (struct option){NULL, 0, NULL, 0};
}

/* The flag as typed, without its value: "--hidden-size=12" -> "--hidden-size". */
static void typed_flag(char *dst, size_t len, const char *arg) {
    size_t n = strcspn(arg, "=");
    if (n >= len) n = len - 1;
    memcpy(dst, arg, n);
    dst[n] = '\0';
}

static int is_exact_flag(const char *typed, const char *name) {
    return strncmp(typed, "--", 2) == 0 && strcmp(typed + 2, name) == 0;
}

static const char *flag_example(int val) {
    return val == CONFIG_VAL ? "FILE.ini" : OPTIONS[val - OPTION_VAL_BASE].default_text;
}

static const char *flag_name(int val) {
    return val == CONFIG_VAL ? "config" : OPTIONS[val - OPTION_VAL_BASE].name;
}

/* The value of a 0|1 switch whose value getopt_long did not attach with '=':
 * the next argument unless that is another flag, else 1 (a bare switch, as
 * in Megatron: --moe-router-enable-expert-bias alone turns it on). */
static const char *switch_value(int argc, char **argv) {
    if (optind < argc && strncmp(argv[optind], "--", 2) != 0) return argv[optind++];
    return "1";
}

/* One getopt_long pass that records every --flag value without applying it,
 * so the INI file can be applied first and flags win regardless of order. */
static int collect_flags(int argc, char **argv, FlagValue *flags, int *num_flags,
                         const char **config_path, char *err, size_t errlen) {
    struct option longopts[NUM_OPTIONS + 2];
    build_long_options(longopts);
    /* '+': stop at the first positional instead of permuting argv;
     * ':': report a missing value as ':' so we can word the message.
     * optind = 0 makes glibc reinitialise, so repeated calls work. */
    opterr = 0;
    optind = 0;
    *num_flags = 0;
    for (;;) {
        int at = optind > 0 ? optind : 1;
        int longindex = -1;
        int val = getopt_long(argc, argv, "+:", longopts, &longindex);
        if (val == -1) break;
        char typed[KEY_MAX];
        typed_flag(typed, sizeof(typed), argv[at]);
        if (val == ':')
            return fail(err, errlen,
                        "--%s needs a value; every flag but the 0|1 switches takes one, e.g. "
                        "--%s %s",
                        flag_name(optopt), flag_name(optopt), flag_example(optopt));
        /* getopt_long also accepts unique prefixes; we do not, so adding a
         * key later cannot change what an existing command line means. */
        if (val == '?' || !is_exact_flag(typed, longopts[longindex].name))
            return fail_unknown_key(err, errlen, "", "flag", typed, "--", "config");
        const char *value = optarg ? optarg : switch_value(argc, argv);
        if (strncmp(value, "--", 2) == 0)
            return fail(err, errlen,
                        "%s needs a value but got the flag %s; every flag but the 0|1 switches "
                        "takes one, e.g. %s %s",
                        typed, value, typed, flag_example(val));
        if (val == CONFIG_VAL) {
            if (*config_path)
                return fail(err, errlen,
                            "--config given twice (%s and %s); give one file and override "
                            "single keys with flags",
                            *config_path, value);
            *config_path = value;
            continue;
        }
        flags[(*num_flags)++] = (FlagValue){&OPTIONS[val - OPTION_VAL_BASE], value};
    }
    if (optind < argc)
        return fail(err, errlen,
                    "unexpected argument \"%s\"; flags come as --key value "
                    "(moesim --help lists every key)",
                    argv[optind]);
    return 0;
}

int config_parse_args(Config *cfg, int argc, char **argv, char *err, size_t errlen) {
    if (argc < 1)
        return fail(err, errlen, "no subcommand given; run moesim train [--flag value ...]");
    FlagValue *flags = malloc((size_t)argc * sizeof(*flags));
    if (!flags) return fail(err, errlen, "out of memory while parsing %d arguments", argc);
    int num_flags = 0;
    const char *config_path = NULL;
    int rc = collect_flags(argc, argv, flags, &num_flags, &config_path, err, errlen);
    if (rc == 0 && config_path) rc = apply_ini_file(cfg, config_path, err, errlen);
    for (int i = 0; rc == 0 && i < num_flags; i++)
        rc = apply_given(cfg, flags[i].opt, flags[i].value, "--", err, errlen);
    free(flags);
    return rc;
}

/* --------------------------------------------------------------------------
 * Validation */

/* A Config filled in by code rather than parsed has skipped the table's
 * checks; running each value back through its parser applies them. */
static int validate_values(const Config *cfg, char *err, size_t errlen) {
    Config scratch = *cfg;
    for (size_t i = 0; i < NUM_OPTIONS; i++) {
        char value[MOESIM_PATH_MAX];
        format_value(value, sizeof(value), cfg, &OPTIONS[i]);
        if (apply_value(&scratch, &OPTIONS[i], value, "--", err, errlen) != 0) return -1;
    }
    return 0;
}

/* The user chose this value: gave the key explicitly, or (a Config filled
 * in by code, which records nothing as given) set it away from its default.
 * A default may give way to what another key implies; a choice may not. */
static int chosen_by_user(const Config *cfg, const char *key) {
    const Option *opt = find_option(key);
    if (!opt) return 0;
    if (cfg->given[opt - OPTIONS]) return 1;
    Config defaults;
    config_defaults(&defaults);
    const void *value = const_field_of(cfg, opt), *fallback = const_field_of(&defaults, opt);
    return opt->type == OPT_STRING ? strcmp(value, fallback) != 0
                                   : memcmp(value, fallback, opt->size) != 0;
}

static int router_is(const Config *cfg, const char *type) {
    return strcmp(cfg->moe_router_type, type) == 0;
}

/* The k a router type fixes whatever --moe-router-topk says, or 0 when it
 * uses --moe-router-topk. */
static int implied_topk(const Config *cfg) {
    if (router_is(cfg, "switch")) return 1;
    if (router_is(cfg, "gshard_top2")) return 2;
    if (router_is(cfg, "soft")) return cfg->num_experts;
    return 0;
}

/* Switch and soft weight each expert's output by its plain probability. */
static int uses_raw_probabilities(const Config *cfg) {
    return router_is(cfg, "switch") || router_is(cfg, "soft");
}

static int validate_model_shape(const Config *cfg, char *err, size_t errlen) {
    int implied = implied_topk(cfg);
    if (implied > cfg->num_experts)
        return fail(err, errlen,
                    "--moe-router-type %s routes each token to %d experts but --num-experts is "
                    "%d; raise --num-experts to at least %d or choose another router type",
                    cfg->moe_router_type, implied, cfg->num_experts, implied);
    if (!implied && cfg->moe_router_topk > cfg->num_experts)
        return fail(err, errlen,
                    "--moe-router-topk %d is larger than --num-experts %d; each token picks k "
                    "distinct experts, so lower --moe-router-topk or raise --num-experts",
                    cfg->moe_router_topk, cfg->num_experts);
    if (cfg->hidden_size % cfg->num_attention_heads != 0) {
        int heads = cfg->num_attention_heads;
        int lower = cfg->hidden_size / heads * heads;
        int suggestion = lower > 0 ? lower : heads;
        return fail(err, errlen,
                    "--hidden-size %d is not divisible by --num-attention-heads %d; every head "
                    "needs the same width, so use e.g. --hidden-size %d",
                    cfg->hidden_size, heads, suggestion);
    }
    return 0;
}

/* Settings that each work alone but contradict the router type or each
 * other. Defaults never trip these (a default that does not fit gives way in
 * config_resolve), so every message names a flag the user gave. */
static int validate_router_type(const Config *cfg, char *err, size_t errlen) {
    const char *type = cfg->moe_router_type;
    if (strcmp(cfg->moe_router_score_function, "sigmoid") == 0 && !router_is(cfg, "topk"))
        return fail(err, errlen,
                    "--moe-router-score-function sigmoid works only with --moe-router-type topk, "
                    "not %s: independent per-expert scores need a plain top-k selection; use "
                    "--moe-router-type topk or --moe-router-score-function softmax",
                    type);
    if (cfg->moe_router_enable_expert_bias && !router_is(cfg, "topk"))
        return fail(err, errlen,
                    "--moe-router-enable-expert-bias 1 works only with --moe-router-type topk, "
                    "not %s: the bias shifts which k experts a token selects; use "
                    "--moe-router-type topk or --moe-router-enable-expert-bias 0",
                    type);
    if (cfg->moe_router_enable_expert_bias && cfg->moe_router_bias_update_rate == 0)
        return fail(err, errlen,
                    "--moe-router-enable-expert-bias 1 with --moe-router-bias-update-rate 0 "
                    "never moves the bias; give a rate such as --moe-router-bias-update-rate "
                    "1e-3 (DeepSeek-V3's)");
    if (!cfg->moe_router_enable_expert_bias && cfg->moe_router_bias_update_rate > 0 &&
        chosen_by_user(cfg, "moe-router-bias-update-rate"))
        return fail(err, errlen,
                    "--moe-router-bias-update-rate %g does nothing with "
                    "--moe-router-enable-expert-bias 0; add --moe-router-enable-expert-bias "
                    "or leave the rate out",
                    cfg->moe_router_bias_update_rate);
    if (cfg->moe_load_loss_coeff > 0 && !router_is(cfg, "noisy_topk"))
        return fail(err, errlen,
                    "--moe-load-loss-coeff %g needs --moe-router-type noisy_topk, not %s: the "
                    "smooth load estimate is the chance of staying in the top k under the "
                    "router noise; use --moe-router-type noisy_topk or --moe-load-loss-coeff 0",
                    cfg->moe_load_loss_coeff, type);
    if (router_is(cfg, "expert_choice")) {
        if (strcmp(cfg->moe_token_drop_policy, "probs") == 0)
            return fail(err, errlen,
                        "--moe-token-drop-policy probs does not apply to --moe-router-type "
                        "expert_choice: experts pick their own tokens, so no expert overflows "
                        "and there is nothing to drop; leave --moe-token-drop-policy at position");
        if (cfg->moe_expert_capacity_factor == 0)
            return fail(err, errlen,
                        "--moe-router-type expert_choice with --moe-expert-capacity-factor 0: "
                        "each expert picks C = factor x group size x k / experts tokens, so it "
                        "needs a capacity; give a factor such as 1.25");
        if (cfg->moe_eval_capacity_factor == 0)
            return fail(err, errlen,
                        "--moe-router-type expert_choice with --moe-eval-capacity-factor 0: "
                        "each expert picks C = factor x group size x k / experts tokens, so it "
                        "needs a capacity; give -1 (the training factor) or a factor such as "
                        "1.25");
    }
    if (router_is(cfg, "soft")) {
        if (cfg->moe_expert_capacity_factor != 0 &&
            chosen_by_user(cfg, "moe-expert-capacity-factor"))
            return fail(err, errlen,
                        "--moe-router-type soft with --moe-expert-capacity-factor %g: soft "
                        "routing sends every token to every expert and has no capacity: pass "
                        "--moe-expert-capacity-factor 0 or leave it out",
                        cfg->moe_expert_capacity_factor);
        if (cfg->moe_eval_capacity_factor > 0)
            return fail(err, errlen,
                        "--moe-router-type soft with --moe-eval-capacity-factor %g: soft "
                        "routing sends every token to every expert and has no capacity: pass "
                        "--moe-eval-capacity-factor 0 or -1",
                        cfg->moe_eval_capacity_factor);
    }
    return 0;
}

/* Group-limited routing: a token's k experts come from its best groups. */
static int validate_router_groups(const Config *cfg, char *err, size_t errlen) {
    int groups = cfg->moe_router_num_groups, group_topk = cfg->moe_router_group_topk;
    if (groups == 0 && group_topk == 0) return 0;
    if (groups == 0 || group_topk == 0)
        return fail(err, errlen,
                    "--moe-router-num-groups %d with --moe-router-group-topk %d: group-limited "
                    "routing needs both (e.g. --moe-router-num-groups 4 --moe-router-group-topk "
                    "2), or neither",
                    groups, group_topk);
    if (cfg->num_experts % groups != 0)
        return fail(err, errlen,
                    "--moe-router-num-groups %d does not divide --num-experts %d: every group "
                    "holds the same number of consecutive experts; use a divisor of %d such as "
                    "the expert-parallel size",
                    groups, cfg->num_experts, cfg->num_experts);
    if (group_topk > groups)
        return fail(err, errlen,
                    "--moe-router-group-topk %d is larger than --moe-router-num-groups %d: a "
                    "token cannot use more groups than there are; use at most %d",
                    group_topk, groups, groups);
    if (router_is(cfg, "expert_choice") || router_is(cfg, "soft") || router_is(cfg, "noisy_topk"))
        return fail(err, errlen,
                    "--moe-router-num-groups works with the top-k routers (topk, switch, "
                    "gshard_top2, sinkhorn), not --moe-router-type %s: %s; drop the group flags "
                    "or choose a top-k router",
                    cfg->moe_router_type,
                    router_is(cfg, "noisy_topk")
                        ? "its load loss assumes every expert is a candidate"
                        : "there tokens do not pick their experts");
    int k = implied_topk(cfg) ? implied_topk(cfg) : cfg->moe_router_topk;
    int reachable = group_topk * (cfg->num_experts / groups);
    if (k > reachable)
        return fail(err, errlen,
                    "--moe-router-group-topk %d of %d groups leaves %d experts per token, fewer "
                    "than the %d it routes to; raise --moe-router-group-topk or lower the top-k",
                    group_topk, groups, reachable, k);
    return 0;
}

/* Hierarchical MoE: k experts per token, k / group-topk from each of the
 * group-topk groups the primary router picks. */
static int validate_hierarchical(const Config *cfg, char *err, size_t errlen) {
    int groups = cfg->moe_hierarchical_groups, group_topk = cfg->moe_hierarchical_group_topk;
    if (groups == 0) {
        if (group_topk != 1 && chosen_by_user(cfg, "moe-hierarchical-group-topk"))
            return fail(err, errlen,
                        "--moe-hierarchical-group-topk %d without --moe-hierarchical-groups: "
                        "give the number of groups too (e.g. --moe-hierarchical-groups 4), or "
                        "drop the group top-k",
                        group_topk);
        return 0;
    }
    if (cfg->num_experts % groups != 0)
        return fail(err, errlen,
                    "--moe-hierarchical-groups %d does not divide --num-experts %d: every group "
                    "holds the same number of consecutive experts; use a divisor of %d",
                    groups, cfg->num_experts, cfg->num_experts);
    if (group_topk > groups)
        return fail(err, errlen,
                    "--moe-hierarchical-group-topk %d is larger than --moe-hierarchical-groups "
                    "%d: the primary router cannot pick more groups than there are; use at "
                    "most %d",
                    group_topk, groups, groups);
    if (!router_is(cfg, "topk") && !router_is(cfg, "switch") && !router_is(cfg, "noisy_topk"))
        return fail(err, errlen,
                    "--moe-hierarchical-groups works with --moe-router-type topk, switch or "
                    "noisy_topk, not %s: the hierarchical router picks experts itself by top-k "
                    "within groups; drop --moe-hierarchical-groups or choose topk",
                    cfg->moe_router_type);
    if (cfg->moe_router_num_groups > 0)
        return fail(err, errlen,
                    "--moe-hierarchical-groups with --moe-router-num-groups: both restrict a "
                    "token to groups of experts, in different ways; use one of them");
    if (strcmp(cfg->moe_router_score_function, "sigmoid") == 0)
        return fail(err, errlen,
                    "--moe-hierarchical-groups with --moe-router-score-function sigmoid: the "
                    "hierarchical scores are products of two softmaxes; use softmax");
    if (cfg->moe_router_enable_expert_bias)
        return fail(err, errlen,
                    "--moe-hierarchical-groups with --moe-router-enable-expert-bias: the bias "
                    "would only act within a group, not on the primary router's choice; drop "
                    "one of them");
    int k = implied_topk(cfg) ? implied_topk(cfg) : cfg->moe_router_topk;
    if (k % group_topk != 0 || k / group_topk > cfg->num_experts / groups)
        return fail(err, errlen,
                    "--moe-hierarchical-group-topk %d with top-k %d and %d experts per group: "
                    "each chosen group gives k / group-topk experts, so the group top-k must "
                    "divide k and k / group-topk be at most %d",
                    group_topk, k, cfg->num_experts / groups, cfg->num_experts / groups);
    return 0;
}

static int validate_routing(const Config *cfg, char *err, size_t errlen) {
    long long tokens = (long long)cfg->micro_batch_size * cfg->seq_length;
    if (tokens > INT_MAX)
        return fail(err, errlen,
                    "--micro-batch-size %d x --seq-length %d = %lld tokens per micro-batch, "
                    "more than %d; lower one of them",
                    cfg->micro_batch_size, cfg->seq_length, tokens, INT_MAX);
    if (cfg->moe_group_size != 0 && tokens % cfg->moe_group_size != 0) {
        /* a micro-batch must hold whole groups: B * T a multiple of G */
        /* the smallest micro-batch that holds whole groups */
        long long step = config_grain_tokens(cfg) / cfg->seq_length;
        return fail(err, errlen,
                    "--moe-group-size %d does not divide the %lld tokens of a micro-batch "
                    "(--micro-batch-size %d x --seq-length %d), so a routing group would be split "
                    "across ranks; use --micro-batch-size %lld, %lld or another multiple of %lld, "
                    "or a group size dividing %lld such as %d, or 0 for one group per micro-batch",
                    cfg->moe_group_size, tokens, cfg->micro_batch_size, cfg->seq_length, step,
                    2 * step, step, tokens, cfg->seq_length <= tokens ? cfg->seq_length : 1);
    }
    return 0;
}

static int uses_synthetic_data(const Config *cfg) {
    return strcmp(cfg->data_format, "synthetic") == 0 ||
           (strcmp(cfg->data_format, "auto") == 0 && strcmp(cfg->data_path, "synthetic") == 0);
}

static int validate_data_path(const Config *cfg, char *err, size_t errlen) {
    if (uses_synthetic_data(cfg)) return 0;
    struct stat st;
    int rc = stat(cfg->data_path, &st);
    if (rc == 0) rc = access(cfg->data_path, S_ISDIR(st.st_mode) ? R_OK | X_OK : R_OK);
    if (rc != 0)
        return fail(err, errlen,
                    "--data-path %s: %s; point it at a text file, a directory of text files, "
                    "or a .tok token file (or use --data-format synthetic)",
                    cfg->data_path, strerror(errno));
    return 0;
}

/* A checkpoint directory: created when missing (with its parents). */
static int validate_directory(const char *key, const char *path, char *err, size_t errlen) {
    if (output_make_dirs(path, key, path, err, errlen) != 0) return -1;
    if (access(path, W_OK | X_OK) != 0)
        return fail(err, errlen, "--%s %s is not a writable directory (%s); choose another --%s",
                    key, path, strerror(errno), key);
    return 0;
}

/* dir (the directory of --key path) exists or mkdir -p can make it: its
 * nearest existing ancestor is a directory we may write in. */
static int validate_creatable_directory(const char *key, const char *path, const char *dir,
                                        char *err, size_t errlen) {
    char ancestor[MOESIM_PATH_MAX];
    snprintf(ancestor, sizeof ancestor, "%s", dir);
    struct stat st;
    while (stat(ancestor, &st) != 0) {
        if (errno != ENOENT && errno != ENOTDIR)
            return fail(err, errlen,
                        "--%s %s: directory %s cannot be used (%s); choose another "
                        "--%s",
                        key, path, ancestor, strerror(errno), key);
        char *up = dirname(ancestor);
        memmove(ancestor, up, strlen(up) + 1);
    }
    if (!S_ISDIR(st.st_mode))
        return fail(err, errlen, "--%s %s: %s is not a directory; choose another --%s", key, path,
                    ancestor, key);
    if (access(ancestor, W_OK | X_OK) != 0)
        return fail(err, errlen,
                    "--%s %s: directory %s is not writable (%s); choose a writable "
                    "location for --%s",
                    key, path, ancestor, strerror(errno), key);
    return 0;
}

/* `path` (the value of --key) must name a file we may create; its directory
 * may be missing (rank 0 makes it at start). */
static int validate_output_path(const char *key, const char *path, char *err, size_t errlen) {
    size_t len = strlen(path);
    if (len > 0 && path[len - 1] == '/')
        return fail(err, errlen, "--%s %s names a directory; give a file path such as %smoesim.h5",
                    key, path, path);
    struct stat st;
    if (stat(path, &st) == 0) {
        if (S_ISDIR(st.st_mode))
            return fail(err, errlen,
                        "--%s %s is a directory; give a file path such as %s/moesim.h5", key, path,
                        path);
        if (access(path, W_OK) != 0)
            return fail(err, errlen,
                        "--%s %s exists and cannot be overwritten (%s); remove it or choose "
                        "another --%s",
                        key, path, strerror(errno), key);
    }
    char dir[MOESIM_PATH_MAX];
    memcpy(dir, path, len + 1);
    return validate_creatable_directory(key, path, dirname(dir), err, errlen);
}

/* A run in which nothing can train is almost surely a mistake (say, "non-moe"
 * on a model without MoE layers); it would only evaluate, at training cost. */
static int validate_freeze(const Config *cfg, char *err, size_t errlen) {
    int moe = config_num_moe_layers(cfg) > 0;
    unsigned present = FREEZE_ATTENTION | FREEZE_NON_MOE_REST;
    if (moe) present |= FREEZE_ROUTER | FREEZE_EXPERTS;
    if ((present & ~config_freeze_groups(cfg)) != 0) return 0;
    return fail(err, errlen,
                "--freeze %s freezes every parameter of the model%s, so nothing would train; "
                "leave at least one group trainable",
                cfg->freeze, moe ? "" : " (it has no MoE layers: non-moe is all of it)");
}

/* --dense 1 beside a --moe-layer-freq that places MoE layers asks for two
 * different models; a frequency beyond the layer count says the same thing
 * as --dense and is accepted (sweeps written before --dense use it). */
static int validate_dense(const Config *cfg, char *err, size_t errlen) {
    if (!cfg->dense || !chosen_by_user(cfg, "moe-layer-freq") ||
        cfg->moe_layer_freq > cfg->num_layers)
        return 0;
    return fail(err, errlen,
                "--dense 1 asks for a model without MoE layers but --moe-layer-freq %d places "
                "MoE layers among its %d layers; leave --moe-layer-freq out for a dense model, "
                "or drop --dense for an MoE model",
                cfg->moe_layer_freq, cfg->num_layers);
}

/* The peak learning rate is reached at the end of the warm-up; a warm-up the
 * user chose that outlasts the run never gets there. */
static int validate_warmup(const Config *cfg, char *err, size_t errlen) {
    if (!chosen_by_user(cfg, "lr-warmup-iters") || cfg->lr_warmup_iters < cfg->train_iters)
        return 0;
    int suggestion = cfg->train_iters / 10;
    return fail(err, errlen,
                "--lr-warmup-iters %d is not shorter than --train-iters %d, so the learning rate "
                "never reaches --lr; give --lr-warmup-iters below %d (e.g. %d, a tenth of the "
                "run) or raise --train-iters above %d",
                cfg->lr_warmup_iters, cfg->train_iters, cfg->train_iters, suggestion,
                cfg->lr_warmup_iters);
}

int config_continues_record(const Config *cfg) {
    return cfg->load[0] && !cfg->finetune;
}

int config_validate(const Config *cfg, char *err, size_t errlen) {
    if (validate_values(cfg, err, errlen) != 0) return -1;
    if (validate_model_shape(cfg, err, errlen) != 0) return -1;
    if (validate_dense(cfg, err, errlen) != 0) return -1;
    if (validate_warmup(cfg, err, errlen) != 0) return -1;
    if (validate_router_type(cfg, err, errlen) != 0) return -1;
    if (validate_router_groups(cfg, err, errlen) != 0) return -1;
    if (validate_hierarchical(cfg, err, errlen) != 0) return -1;
    if (validate_routing(cfg, err, errlen) != 0) return -1;
    if (validate_freeze(cfg, err, errlen) != 0) return -1;
    if (validate_data_path(cfg, err, errlen) != 0) return -1;
    if (validate_output_path("out", cfg->out, err, errlen) != 0) return -1;
    return cfg->save[0] ? validate_directory("save", cfg->save, err, errlen) : 0;
}

static int gcd(int a, int b) {
    while (b) {
        int r = a % b;
        a = b;
        b = r;
    }
    return a;
}

/* --expert-model-parallel-size 0 took the EP size from the rank count, so
 * the message must say so: the user never typed that number. */
static int fail_implicit_ep(const Config *cfg, int world_size, char *err, size_t errlen) {
    const char *why =
        world_size > cfg->num_experts ? ": every rank must own at least one expert" : " evenly";
    return fail(err, errlen,
                "the expert-parallel size was taken from the rank count (--expert-model-"
                "parallel-size 0, the default): %d ranks cannot share --num-experts %d%s; give "
                "--expert-model-parallel-size %d (a divisor of both the %d ranks and the %d "
                "experts), or launch a number of ranks that divides %d",
                world_size, cfg->num_experts, why, gcd(world_size, cfg->num_experts), world_size,
                cfg->num_experts, cfg->num_experts);
}

int config_validate_layout(const Config *cfg, int world_size, char *err, size_t errlen) {
    int ep = config_ep_size(cfg, world_size);
    /* a model without MoE layers has no experts to share out */
    int has_experts = config_num_moe_layers(cfg) > 0;
    if (has_experts && cfg->expert_model_parallel_size == 0 && cfg->num_experts % ep != 0)
        return fail_implicit_ep(cfg, world_size, err, errlen);
    if (has_experts && ep > cfg->num_experts)
        return fail(err, errlen,
                    "--expert-model-parallel-size %d is larger than --num-experts %d: every "
                    "rank of an expert-parallel group must own at least one expert; lower "
                    "--expert-model-parallel-size or raise --num-experts",
                    ep, cfg->num_experts);
    if (world_size % ep != 0)
        return fail(err, errlen,
                    "--expert-model-parallel-size %d does not divide the %d ranks of this run; "
                    "use a divisor of %d (or launch a multiple of %d ranks)",
                    ep, world_size, world_size, ep);
    if (cfg->moe_overlap_chunks > 1 && strcmp(cfg->moe_token_dispatcher_type, "hierarchical") == 0)
        return fail(err, errlen,
                    "--moe-overlap-chunks %d overlaps the alltoall dispatcher only; use "
                    "--moe-token-dispatcher-type alltoall or --moe-overlap-chunks 1",
                    cfg->moe_overlap_chunks);
    if (cfg->moe_expert_shadowing &&
        (cfg->moe_overlap_chunks > 1 || strcmp(cfg->moe_token_dispatcher_type, "hierarchical") == 0))
        return fail(err, errlen,
                    "--moe-expert-shadowing 1 shadows with the alltoall dispatcher without "
                    "overlap only; use --moe-token-dispatcher-type alltoall and "
                    "--moe-overlap-chunks 1, or --moe-expert-shadowing 0");
    if (cfg->ranks_per_node > 0 && world_size % cfg->ranks_per_node != 0)
        return fail(err, errlen,
                    "--ranks-per-node %d does not divide the %d ranks of this run into whole "
                    "nodes; use a divisor of %d, or 0 to take the nodes from shared memory",
                    cfg->ranks_per_node, world_size, world_size);
    if (has_experts && cfg->num_experts % ep != 0)
        return fail(err, errlen,
                    "--num-experts %d is not divisible by --expert-model-parallel-size %d; each "
                    "rank must own the same number of experts, so make the experts a multiple "
                    "of %d or pick a parallel size that divides %d",
                    cfg->num_experts, ep, ep, cfg->num_experts);
    return 0;
}

int config_ep_size(const Config *cfg, int world_size) {
    return cfg->expert_model_parallel_size > 0 ? cfg->expert_model_parallel_size : world_size;
}

void config_resolve(Config *cfg) {
    /* Everything downstream (model, record, analysis) asks the frequency. */
    if (cfg->dense) cfg->moe_layer_freq = cfg->num_layers + 1;
    /* Validation let only a default capacity factor through: soft routing is dropless. */
    if (router_is(cfg, "soft")) cfg->moe_expert_capacity_factor = 0;
    int implied = implied_topk(cfg);
    if (implied) cfg->moe_router_topk = implied;
    if (uses_raw_probabilities(cfg)) {
        cfg->moe_router_norm_topk_prob = 0;
        cfg->moe_router_pre_softmax = 1;
    }
}

/* --------------------------------------------------------------------------
 * Output */

char *config_to_ini(const Config *cfg) {
    char *text = NULL;
    size_t size = 0;
    FILE *stream = open_memstream(&text, &size);
    if (!stream) return NULL;
    for (size_t i = 0; i < NUM_OPTIONS; i++) {
        char value[MOESIM_PATH_MAX];
        format_value(value, sizeof(value), cfg, &OPTIONS[i]);
        fprintf(stream, "%s = %s\n", OPTIONS[i].name, value);
    }
    int write_failed = ferror(stream);
    if (fclose(stream) != 0 || write_failed) {
        free(text);
        return NULL;
    }
    return text;
}

int config_entry_count(void) {
    return (int)NUM_OPTIONS;
}

void config_entry(const Config *cfg, int index, ConfigEntry *entry) {
    const Option *opt = &OPTIONS[index];
    const char *field = (const char *)cfg + opt->offset;
    memset(entry, 0, sizeof *entry);
    entry->key = opt->name;
    switch (opt->type) {
        case OPT_INT:
        case OPT_BOOL:
            entry->type = CONFIG_VALUE_INT;
            entry->int_value = *(const int *)field;
            break;
        case OPT_LONG:
            entry->type = CONFIG_VALUE_INT;
            entry->int_value = *(const long *)field;
            break;
        case OPT_DOUBLE:
            entry->type = CONFIG_VALUE_DOUBLE;
            entry->double_value = *(const double *)field;
            break;
        case OPT_STRING:
            entry->type = CONFIG_VALUE_STRING;
            entry->string_value = field;
            break;
    }
}

int config_layer_freq_is_moe(int layer, int moe_layer_freq) {
    return moe_layer_freq > 0 && (layer + 1) % moe_layer_freq == 0;
}

int config_is_moe_layer(const Config *cfg, int layer) {
    return !cfg->dense && config_layer_freq_is_moe(layer, cfg->moe_layer_freq);
}

int config_num_moe_layers(const Config *cfg) {
    int count = 0;
    for (int layer = 0; layer < cfg->num_layers; layer++) count += config_is_moe_layer(cfg, layer);
    return count;
}

int config_group_size(const Config *cfg) {
    return cfg->moe_group_size != 0 ? cfg->moe_group_size : cfg->micro_batch_size * cfg->seq_length;
}

int config_grain_tokens(const Config *cfg) {
    long long a = config_group_size(cfg), b = cfg->seq_length;
    while (b) { /* gcd */
        long long r = a % b;
        a = b;
        b = r;
    }
    return (int)(config_group_size(cfg) / a * cfg->seq_length);
}

unsigned config_freeze_groups(const Config *cfg) {
    static const struct {
        const char *name;
        unsigned groups;
    } names[] = {
        {"attention", FREEZE_ATTENTION},
        {"router", FREEZE_ROUTER},
        {"experts", FREEZE_EXPERTS},
        {"non-moe", FREEZE_ATTENTION | FREEZE_NON_MOE_REST},
        {"moe", FREEZE_ROUTER | FREEZE_EXPERTS},
    };
    unsigned groups = 0;
    for (const char *item = cfg->freeze; *item;) {
        size_t len = strcspn(item, ",");
        for (size_t i = 0; i < sizeof names / sizeof names[0]; i++)
            if (strlen(names[i].name) == len && strncmp(item, names[i].name, len) == 0)
                groups |= names[i].groups;
        item += len + (item[len] == ',');
    }
    return groups;
}

int config_uses_bf16(const Config *cfg) {
    return strcmp(cfg->precision, "bf16") == 0 || strcmp(cfg->moe_router_precision, "bf16") == 0;
}

static const char *metavar_of(const Option *opt) {
    if (opt->metavar) return opt->metavar;
    if (opt->choices) return opt->choices;
    switch (opt->type) {
        case OPT_INT:
        case OPT_LONG:
            return "N";
        case OPT_DOUBLE:
            return "X";
        case OPT_BOOL:
            return "[0|1]";
        case OPT_STRING:
            return "TEXT";
    }
    return "VALUE";
}

void config_print_help(void) {
    printf("  %-44s %s\n", "--config FILE",
           "INI file applied before the flags; [sections] are ignored");
    const char *group = NULL;
    for (size_t i = 0; i < NUM_OPTIONS; i++) {
        const Option *opt = &OPTIONS[i];
        if (!group || strcmp(group, opt->group) != 0) {
            group = opt->group;
            printf("\n%s:\n", group);
        }
        char flag[KEY_MAX * 2];
        snprintf(flag, sizeof(flag), "--%s %s", opt->name, metavar_of(opt));
        printf("  %-44s %s (default %s)\n", flag, opt->help, opt->default_text);
    }
}
