/* data: token sources (byte-level text files or directories, uint16 token
 * files, a synthetic clustered source), the deterministic train/validation
 * split, and per-rank micro-batches. Every token keeps its category (source
 * file, or synthetic cluster) for the specialisation statistics.
 *
 * Token file format (little-endian), for corpora tokenised elsewhere:
 *   offset 0  char[8]  magic "MOESIMTK"
 *   offset 8  uint32   version (1)
 *   offset 12 uint32   vocab_size (1..65536)
 *   offset 16 uint64   num_tokens
 *   offset 24 uint64   reserved (0)
 *   offset 32 uint16   tokens[num_tokens]
 */
#ifndef MOESIM_DATA_H
#define MOESIM_DATA_H

#include <stddef.h>
#include <stdint.h>
#include "moesim/config.h"

#ifdef __cplusplus
extern "C" {
#endif

#define MOESIM_TOKEN_MAGIC "MOESIMTK"
#define MOESIM_TOKEN_VERSION 1u
#define MOESIM_TOKEN_HEADER_BYTES 32

typedef struct TokenStream {
    uint16_t *tokens;    /* [len] */
    int32_t *categories; /* [len] category id of each token */
    size_t len;
} TokenStream;

typedef struct Dataset {
    int vocab_size;
    int num_categories;
    char **category_names; /* [num_categories] */
    TokenStream train;
    TokenStream val;
} Dataset;

/* Loads the source chosen by cfg->data_format / cfg->data_path and splits it.
 * Returns 0, or -1 with a message naming the file and the fix. */
int dataset_load(Dataset *ds, const Config *cfg, char *err, size_t errlen);
void dataset_free(Dataset *ds);

/* Micro-batch `rank` of global training batch `step`: sequence b of this rank
 * is global sequence rank*B+b, so a 1-rank run with P*B sequences sees exactly
 * what P ranks see together. Each array is [B*T]; targets are inputs shifted
 * by one. */
void dataset_train_batch(const Dataset *ds, long seed, long step, int rank, int B, int T,
                         int *inputs, int *targets, int *categories);
/* Same rule on the validation stream; eval batch i is the same at every eval. */
void dataset_val_batch(const Dataset *ds, long seed, long eval_batch, int rank, int B, int T,
                       int *inputs, int *targets, int *categories);

/* Writes tokens in the token-file format. Returns 0, or -1 with err. */
int token_file_write(const char *path, const uint16_t *tokens, size_t n, int vocab_size, char *err,
                     size_t errlen);

#ifdef __cplusplus
}
#endif
#endif
