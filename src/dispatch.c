#include "moesim/dispatch.h"

#include <stdlib.h>
#include <string.h>

int dispatch_init(Dispatch *d, int E, int ep_size, int grains) {
    memset(d, 0, sizeof *d);
    d->E = E;
    d->ep_size = ep_size;
    d->E_local = E / ep_size;
    d->grains = grains;
    size_t splits = (size_t)ep_size * grains;
    d->recv_grain_counts = calloc((size_t)E * grains, sizeof(int));
    d->split_begin = calloc((size_t)d->E_local * (splits + 1), sizeof(int));
    d->rows_per_expert = calloc((size_t)E, sizeof(int));
    d->send_row_begin = calloc((size_t)E + 1, sizeof(int));
    d->recv_counts = calloc((size_t)E, sizeof(int));
    d->expert_row_begin = calloc((size_t)d->E_local + 1, sizeof(int));
    d->send_counts = calloc((size_t)ep_size, sizeof(int));
    d->send_displs = calloc((size_t)ep_size, sizeof(int));
    d->recv_counts_el = calloc((size_t)ep_size, sizeof(int));
    d->recv_displs = calloc((size_t)ep_size, sizeof(int));
    if (!d->send_row_begin || !d->recv_counts || !d->expert_row_begin || !d->send_counts ||
        !d->send_displs || !d->recv_counts_el || !d->recv_displs || !d->recv_grain_counts ||
        !d->split_begin || !d->rows_per_expert) {
        dispatch_free(d);
        return -1;
    }
    return 0;
}

void dispatch_free(Dispatch *d) {
    free(d->send_row_begin);
    free(d->recv_counts);
    free(d->expert_row_begin);
    free(d->send_counts);
    free(d->send_displs);
    free(d->recv_counts_el);
    free(d->recv_displs);
    free(d->recv_grain_counts);
    free(d->split_begin);
    free(d->rows_per_expert);
    memset(d, 0, sizeof *d);
}

void dispatch_plan(Dispatch *d, const int *rows_per_expert_grain, const Comm *comm) {
    int E = d->E, El = d->E_local, grains = d->grains, splits = d->ep_size * grains;
    for (int e = 0; e < E; e++) {
        d->rows_per_expert[e] = 0;
        for (int g = 0; g < grains; g++)
            d->rows_per_expert[e] += rows_per_expert_grain[e * grains + g];
    }
    d->send_row_begin[0] = 0;
    for (int e = 0; e < E; e++)
        d->send_row_begin[e + 1] = d->send_row_begin[e] + d->rows_per_expert[e];
    d->num_send_rows = d->send_row_begin[E];
    /* [source][local expert][grain], in the order the rows arrive */
    if (d->ep_size == 1)
        memcpy(d->recv_grain_counts, rows_per_expert_grain, sizeof(int) * E * grains);
    else
        comm_ep_alltoall_ints(comm, rows_per_expert_grain, d->recv_grain_counts, El * grains);
    d->expert_row_begin[0] = 0;
    for (int j = 0; j < El; j++) {
        int *begin = d->split_begin + (long)j * (splits + 1), rows = 0;
        for (int s = 0; s < d->ep_size; s++) {
            int from_s = 0;
            for (int g = 0; g < grains; g++) {
                begin[s * grains + g] = rows;
                int n = d->recv_grain_counts[((long)s * El + j) * grains + g];
                rows += n;
                from_s += n;
            }
            d->recv_counts[s * El + j] = from_s;
        }
        begin[splits] = rows;
        d->expert_row_begin[j + 1] = d->expert_row_begin[j] + rows;
    }
    d->num_recv_rows = d->expert_row_begin[El];
}

const int *dispatch_expert_splits(const Dispatch *d, int j, int *count) {
    *count = d->ep_size * d->grains;
    return d->split_begin + (long)j * (*count + 1);
}

/* The arguments of the exchange for local expert j: from the sender's block
 * (destination s, expert s*E_local+j) to the owner's block of expert j, whose
 * rows are ordered by source rank. */
static void exchange_arguments(Dispatch *d, int j, int width) {
    int owner_offset = 0;
    for (int s = 0; s < d->ep_size; s++) {
        int e = s * d->E_local + j;
        d->send_counts[s] = (d->send_row_begin[e + 1] - d->send_row_begin[e]) * width;
        d->send_displs[s] = d->send_row_begin[e] * width;
        d->recv_counts_el[s] = d->recv_counts[s * d->E_local + j] * width;
        d->recv_displs[s] = owner_offset;
        owner_offset += d->recv_counts_el[s];
    }
}

void dispatch_rows(Dispatch *d, const float *send, float *recv, int width, const Comm *comm) {
    if (d->ep_size == 1) {
        memcpy(recv, send, sizeof(float) * (size_t)d->num_send_rows * width);
        return;
    }
    for (int j = 0; j < d->E_local; j++) {
        exchange_arguments(d, j, width);
        comm_ep_alltoallv_floats(comm, send, d->send_counts, d->send_displs,
                                 recv + (size_t)d->expert_row_begin[j] * width, d->recv_counts_el,
                                 d->recv_displs);
    }
}

void combine_rows(Dispatch *d, const float *owner, float *back, int width, const Comm *comm) {
    if (d->ep_size == 1) {
        memcpy(back, owner, sizeof(float) * (size_t)d->num_recv_rows * width);
        return;
    }
    for (int j = 0; j < d->E_local; j++) {
        exchange_arguments(d, j, width);
        /* Reverse direction: what was received is sent back to where it came from. */
        comm_ep_alltoallv_floats(comm, owner + (size_t)d->expert_row_begin[j] * width,
                                 d->recv_counts_el, d->recv_displs, back, d->send_counts,
                                 d->send_displs);
    }
}

void dispatch_add_bytes_to_ranks(const Dispatch *d, int width, long *bytes) {
    for (int s = 0; s < d->ep_size; s++) {
        int first = d->send_row_begin[s * d->E_local];
        int last = d->send_row_begin[(s + 1) * d->E_local];
        bytes[s] += (long)(last - first) * width * (long)sizeof(float);
    }
}
