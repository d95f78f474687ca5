/* config: every run setting in one struct — defaults, INI files (libinih),
 * --flag overrides (getopt_long), and validation with messages that name the
 * key, the value and the fix. Every key is both an INI key and a --flag. */
#ifndef MOESIM_CONFIG_H
#define MOESIM_CONFIG_H

#include <stddef.h>

#ifdef __cplusplus
extern "C" {
#endif

#define MOESIM_PATH_MAX 4096
#define MOESIM_ERR_MAX 1024
#define CONFIG_MAX_KEYS 96

typedef struct Config {
    /* model */
    int num_layers;
    int hidden_size;
    int num_attention_heads;
    int ffn_hidden_size;
    int seq_length;
    int dense; /* 1: no MoE layer, every FFN dense (config_resolve sets moe_layer_freq) */
    int untie_embeddings_and_output_weights; /* 0: LM head shares the token embedding */
    char precision[8];            /* fp32 | bf16: inputs of every matmul but the router's */
    char moe_router_precision[8]; /* fp32 | bf16: inputs of the router's matmuls */
    /* mixture of experts */
    int num_experts;
    int moe_router_topk;
    int moe_layer_freq; /* every n-th FFN is an MoE layer (1 = all) */
    int moe_ffn_hidden_size;
    int moe_group_size;             /* tokens per routing group; 0 = one micro-batch */
    int expert_model_parallel_size; /* EP ranks; 0 = the world size */
    char moe_token_dispatcher_type[16]; /* alltoall | hierarchical */
    int ranks_per_node;                 /* 0 = from shared memory; N = emulated nodes of N */
    int moe_overlap_chunks;             /* > 1: expert work overlaps the exchange */
    int overlap_grad_reduce;            /* 1: gradient buckets reduce during backward */
    int moe_expert_shadowing;           /* 1: sources compute their rows of busy experts */
    int moe_shadow_min_rows;            /* rows a shadow must save; 0 = automatic */
    int moe_router_norm_topk_prob;  /* renormalise the k selected probabilities */
    double moe_expert_capacity_factor;
    double moe_aux_loss_coeff;
    double moe_z_loss_coeff;
    char moe_token_drop_policy[16]; /* position | probs */
    /* routing schemes (docs in config.c's table and the README) */
    char moe_router_type[16]; /* topk | switch | noisy_topk | gshard_top2 | expert_choice |
                                 sinkhorn | soft */
    int moe_router_pre_softmax;           /* 1: softmax over all experts, then top-k;
                                             0: softmax over the k selected logits (Mixtral) */
    char moe_router_score_function[16];   /* softmax | sigmoid */
    int moe_router_enable_expert_bias;    /* DeepSeek-V3 aux-loss-free balancing */
    double moe_router_bias_update_rate;   /* 0 = not given */
    double moe_input_jitter_eps;          /* 0 = no jitter */
    double moe_eval_capacity_factor;      /* -1 = the training factor; 0 = dropless */
    int moe_min_capacity;                 /* capacity floor per expert and group */
    char moe_router_load_balancing_type[16]; /* aux_loss | seq_aux_loss | global_aux_loss |
                                                none */
    double moe_importance_loss_coeff;     /* Shazeer 2017 CV^2 of importance */
    double moe_load_loss_coeff;           /* Shazeer 2017 CV^2 of smooth load (noisy_topk) */
    char moe_expert_activation[8];        /* gelu | swiglu */
    int moe_shared_expert_intermediate_size; /* 0 = no shared expert */
    double moe_expert_dropout;            /* rate inside the experts in training; 0 = none */
    double init_method_std;               /* std of every normal-initialised weight */
    int moe_router_num_groups;            /* expert groups for group-limited routing; 0 = off */
    int moe_router_group_topk;            /* groups each token may use (DeepSeek-V3) */
    int moe_hierarchical_groups;          /* Shazeer 2017 hierarchical MoE groups; 0 = off */
    int moe_hierarchical_group_topk;      /* groups the primary router picks per token */
    /* training */
    int micro_batch_size;
    int train_iters;
    int lr_warmup_iters;
    int eval_interval;
    int eval_iters;
    int log_interval;
    int record_group_counts_interval; /* steps between group-count rows; 0 = never */
    int progress_interval;
    double lr;
    double min_lr;
    double weight_decay;
    double clip_grad; /* 0 disables clipping */
    int skip_nonfinite_steps; /* NaN/Inf steps skipped before the run stops as diverged */
    double adam_beta1;
    double adam_beta2;
    double adam_eps;
    long seed;
    char freeze[64]; /* comma list of attention|router|experts|non-moe|moe; "" = none */
    /* data */
    char data_path[MOESIM_PATH_MAX];
    char data_format[16]; /* auto | text | tokens | synthetic */
    double val_fraction;
    int synthetic_clusters;
    long synthetic_tokens;
    /* output */
    char out[MOESIM_PATH_MAX];
    int overwrite;              /* replace an existing record at out */
    char save[MOESIM_PATH_MAX]; /* checkpoint directory; empty = none */
    int save_interval;          /* steps between checkpoints; 0 = only the final one */
    int save_keep;              /* newest checkpoints kept; 0 = all */
    char load[MOESIM_PATH_MAX]; /* checkpoint directory to resume from; empty = fresh start */
    int finetune;               /* --load takes parameters only: step 0, new optimizer */
    int no_load_optim;          /* --load leaves the Adam moments at zero */
    int record_flush_interval;  /* steps between record flushes */
    /* platform */
    int flush_denormals; /* FTZ+DAZ on every rank */
    char bf16_gemm[16];  /* auto | onednn | emulated: how bf16 matmuls run */
    /* moesim bench */
    int bench_warmup_iters; /* steps run before the measured window */
    int bench_iters;        /* steps measured */
    /* 1 for each key (in option-table order) set on the command line, in an
     * INI file or by config_set, so a default can give way where an explicit
     * value is an error (see config_key_given). */
    unsigned char given[CONFIG_MAX_KEYS];
} Config;

/* Fills every field with its default. */
void config_defaults(Config *cfg);

/* Applies one key=value (INI spelling with '-' or '_', or flag name without
 * "--"). Returns 0, or -1 with a message in err naming key, value and fix. */
int config_set(Config *cfg, const char *key, const char *value, char *err, size_t errlen);

/* Parses `train` arguments: --config FILE first (INI), then every other
 * --flag value on top. Returns 0, or -1 with a message in err. */
int config_parse_args(Config *cfg, int argc, char **argv, char *err, size_t errlen);

/* 1 when key (flag spelling) was set explicitly: on the command line, in an
 * INI file or by config_set, even to its default value. */
int config_key_given(const Config *cfg, const char *key);

/* 1 when the run continues the record at --out: --load without --finetune. */
int config_continues_record(const Config *cfg);

/* Checks cross-key constraints, the data path and the output locations (a
 * missing directory of --out passes when it can be created). Touches nothing
 * on disk but creating a missing --save directory. Returns 0, or -1 with a
 * message in err. */
int config_validate(const Config *cfg, char *err, size_t errlen);

/* Checks the expert-parallel layout against the number of ranks: EP must
 * divide the world size, the experts must divide over EP, and EP may not
 * exceed the experts. Returns 0, or -1 with a message in err. */
int config_validate_layout(const Config *cfg, int world_size, char *err, size_t errlen);
int config_ep_size(const Config *cfg, int world_size); /* resolves the 0 default */

/* One key's resolved value, typed, for writing the config as attributes. */
typedef enum { CONFIG_VALUE_INT, CONFIG_VALUE_DOUBLE, CONFIG_VALUE_STRING } ConfigValueType;
typedef struct ConfigEntry {
    const char *key; /* flag spelling, e.g. "num-experts" */
    ConfigValueType type;
    long int_value;  /* ints, longs and booleans */
    double double_value;
    const char *string_value; /* points into the Config */
} ConfigEntry;

int config_entry_count(void);
void config_entry(const Config *cfg, int index, ConfigEntry *entry);

/* The fully resolved config as INI text (every key). Caller frees. */
char *config_to_ini(const Config *cfg);

/* After validation: fixes the keys a router type implies (switch routes
 * top-1 with raw probabilities, gshard_top2 top-2, soft every expert and
 * dropless), so the recorded config says what actually ran. */
void config_resolve(Config *cfg);

/* Derived quantities used across modules. */
/* The one rule for which transformer blocks hold an MoE layer: every
 * moe_layer_freq-th, counting from 1 (so 1 = every block). */
int config_layer_freq_is_moe(int layer, int moe_layer_freq);
int config_is_moe_layer(const Config *cfg, int layer);
int config_num_moe_layers(const Config *cfg);
int config_group_size(const Config *cfg); /* resolves the 0 default */
/* lcm(group size, seq length): whole routing groups and whole sequences, the
 * unit every layout keeps on one rank (the grain of reduce.h). */
int config_grain_tokens(const Config *cfg);
/* The parameter groups --freeze names, as bits: attention (ln1, qkv, proj),
 * router (router and noise weights, and the DeepSeek selection bias), experts
 * (routed and shared), and the rest of the non-MoE parameters (embeddings,
 * ln2, the final norm, dense FFNs, the LM head). "non-moe" is attention and
 * the rest, "moe" router and experts. model_freeze says which tensor is in
 * which group. */
enum {
    FREEZE_ATTENTION = 1,
    FREEZE_ROUTER = 2,
    FREEZE_EXPERTS = 4,
    FREEZE_NON_MOE_REST = 8,
};
/* The groups cfg->freeze names (0 for ""); a valid value assumed. */
unsigned config_freeze_groups(const Config *cfg);
/* 1 when any matmul runs with bf16 inputs (--precision or --moe-router-precision). */
int config_uses_bf16(const Config *cfg);

/* Prints the flag reference (used by `moesim --help`). */
void config_print_help(void);

#ifdef __cplusplus
}
#endif
#endif
