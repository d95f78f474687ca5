#include "moesim/dispatch.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "moesim/placement.h"

static int hierarchy_init(Hierarchy *h, int E, int ep_size, int grains) {
    size_t P = (size_t)ep_size;
    h->part_of = calloc(P, sizeof(int));
    h->part_begin = calloc(P + 1, sizeof(int));
    h->members = calloc(P, sizeof(int));
    h->all_counts = calloc(P * E * grains, sizeof(int));
    h->block_rows = calloc(P * E, sizeof(int));
    h->send_offset = calloc(P * E, sizeof(int));
    h->recv_offset = calloc(P * E, sizeof(int));
    h->args = calloc(6 * P, sizeof(int));
    return h->part_of && h->part_begin && h->members && h->all_counts && h->block_rows &&
                   h->send_offset && h->recv_offset && h->args
               ? 0
               : -1;
}

static void hierarchy_free(Hierarchy *h) {
    free(h->part_of);
    free(h->part_begin);
    free(h->members);
    free(h->all_counts);
    free(h->block_rows);
    free(h->send_offset);
    free(h->recv_offset);
    free(h->args);
    free(h->gathered);
    free(h->packed);
    free(h->arrived);
    free(h->outgoing);
    memset(h, 0, sizeof *h);
}

int dispatch_init(Dispatch *d, int E, int ep_size, int grains, int hierarchical, int overlap) {
    memset(d, 0, sizeof *d);
    d->E = E;
    d->ep_size = ep_size;
    d->E_local = E / ep_size;
    d->grains = grains;
    d->hierarchical = hierarchical && ep_size > 1;
    if (d->hierarchical && hierarchy_init(&d->h, E, ep_size, grains) != 0) {
        dispatch_free(d);
        return -1;
    }
    d->overlap = overlap && ep_size > 1 && !d->hierarchical;
    if (d->overlap) {
        d->async_args = calloc((size_t)2 * d->E_local * 4 * ep_size, sizeof(int));
        d->requests = malloc(sizeof(MPI_Request) * 2 * (size_t)d->E_local);
        if (!d->async_args || !d->requests) {
            dispatch_free(d);
            return -1;
        }
        for (int i = 0; i < 2 * d->E_local; i++) d->requests[i] = MPI_REQUEST_NULL;
    }
    size_t splits = (size_t)ep_size * grains;
    d->recv_grain_counts = calloc((size_t)E * grains, sizeof(int));
    d->split_begin = calloc((size_t)d->E_local * (splits + 1), sizeof(int));
    d->rows_per_expert = calloc((size_t)E, sizeof(int));
    d->send_row_begin = calloc((size_t)E + 1, sizeof(int));
    d->recv_counts = calloc((size_t)E, sizeof(int));
    d->expert_row_begin = calloc((size_t)d->E_local + 1, sizeof(int));
    d->args = calloc(4 * (size_t)ep_size, sizeof(int));
    d->sent_bytes = calloc((size_t)ep_size, sizeof(long));
    if (!d->sent_bytes || !d->send_row_begin || !d->recv_counts || !d->expert_row_begin ||
        !d->args || !d->recv_grain_counts || !d->split_begin || !d->rows_per_expert) {
        dispatch_free(d);
        return -1;
    }
    return 0;
}

int dispatch_enable_shadowing(Dispatch *d, int min_gain, int max_rows) {
    if (d->ep_size == 1 || d->hierarchical || d->overlap) return 0;
    size_t P = (size_t)d->ep_size, E = (size_t)d->E;
    d->every_count = calloc(P * E * d->grains, sizeof(int));
    d->source_rows = calloc(P * E, sizeof(int));
    d->load = calloc(P, sizeof(int));
    d->shadow = calloc(P * E, 1);
    if (!d->every_count || !d->source_rows || !d->load || !d->shadow) return -1;
    d->shadowing = 1;
    d->shadow_min_gain = min_gain;
    d->shadow_max_rows = max_rows;
    return 0;
}

int dispatch_shadowed(const Dispatch *d, int source, int e) {
    return d->shadowing && d->shadow[(long)source * d->E + e];
}

void dispatch_free(Dispatch *d) {
    hierarchy_free(&d->h);
    free(d->every_count);
    free(d->source_rows);
    free(d->load);
    free(d->shadow);
    free(d->async_args);
    free(d->requests);
    free(d->send_row_begin);
    free(d->recv_counts);
    free(d->expert_row_begin);
    free(d->args);
    free(d->recv_grain_counts);
    free(d->split_begin);
    free(d->rows_per_expert);
    free(d->sent_bytes);
    memset(d, 0, sizeof *d);
}

void dispatch_reset_measures(Dispatch *d) {
    memset(&d->times, 0, sizeof d->times);
    memset(d->sent_bytes, 0, sizeof(long) * (size_t)d->ep_size);
}

/* A blocking exchange of `kind` that ran from `start` until now: all of it
 * exposed, all of it in flight. */
static void charge_blocking(Dispatch *d, enum CommKind kind, double start) {
    double seconds = timer_now_s() - start;
    d->times.exposed_s[kind] += seconds;
    d->times.in_flight_s[kind] += seconds;
}

/* ---- the hierarchical exchange ------------------------------------------------ */

/* Which node each EP position is on, numbered in the order of their first
 * positions: the order of the leaders' communicator (comm_split_nodes). */
static void learn_nodes(Hierarchy *h, int ep_size, const Comm *comm) {
    int *node = h->members; /* scratch until it is filled below */
    comm_ep_allgather_ints(comm, &comm->node, node, 1);
    h->parts = 0;
    for (int p = 0; p < ep_size; p++) {
        int part = -1;
        for (int q = 0; q < p && part < 0; q++)
            if (node[q] == node[p]) part = h->part_of[q];
        h->part_of[p] = part >= 0 ? part : h->parts++;
    }
    int filled = 0;
    for (int part = 0; part < h->parts; part++) {
        h->part_begin[part] = filled;
        for (int p = 0; p < ep_size; p++)
            if (h->part_of[p] == part) h->members[filled++] = p;
    }
    h->part_begin[h->parts] = filled;
}

/* This rank's received counts [source][local expert][grain] from every
 * rank's counts [source][E * grains]: none from a block its source shadows. */
static void receive_counts_of(Dispatch *d, const int *every_count) {
    int P = d->ep_size, E = d->E, El = d->E_local, grains = d->grains;
    Placement place = {.num_experts = E, .ep_size = P};
    for (int s = 0; s < P; s++)
        for (int j = 0; j < El; j++) {
            int e = placement_global_expert(&place, d->ep_rank, j);
            for (int g = 0; g < grains; g++)
                d->recv_grain_counts[((long)s * El + j) * grains + g] =
                    dispatch_shadowed(d, s, e) ? 0 : every_count[((long)s * E + e) * grains + g];
        }
}

/* Every rank's counts, from which this rank's received counts and the place
 * of every block in every buffer follow. */
static void learn_every_count(Dispatch *d, const int *rows_per_expert_grain, const Comm *comm) {
    Hierarchy *h = &d->h;
    int P = d->ep_size, E = d->E, El = d->E_local, grains = d->grains, me = comm->ep_rank;
    if (h->parts == 0) learn_nodes(h, P, comm);
    comm_ep_allgather_ints(comm, rows_per_expert_grain, h->all_counts, E * grains);
    receive_counts_of(d, h->all_counts);
    Placement place = {.num_experts = E, .ep_size = P, .ep_rank = me};
    for (int p = 0; p < P; p++) {
        int offset = 0;
        for (int q = 0; q < P; q++)
            for (int k = 0; k < El; k++) {
                const int *n =
                    h->all_counts + ((long)p * E + placement_global_expert(&place, q, k)) * grains;
                int rows = 0;
                for (int g = 0; g < grains; g++) rows += n[g];
                long b = ((long)p * P + q) * El + k;
                h->block_rows[b] = rows;
                h->send_offset[b] = offset; /* sender layout: by global expert */
                offset += rows;
            }
    }
    for (int q = 0; q < P; q++) {
        int offset = 0;
        for (int k = 0; k < El; k++)
            for (int p = 0; p < P; p++) { /* owner layout: by local expert, then source */
                h->recv_offset[((long)q * P + p) * El + k] = offset;
                offset += h->block_rows[((long)p * P + q) * El + k];
            }
    }
}

/* One direction of the exchange as blocks (p -> q, local expert k): forward
 * from senders to owners, or back (combine) from owners to senders. */
typedef struct Direction {
    const Hierarchy *h;
    int P, El, back;
} Direction;

static long block_index(const Direction *dir, int from, int to, int k) {
    return ((long)from * dir->P + to) * dir->El + k;
}
/* rows rank p sends rank q for its block k */
static int rows_of(const Direction *dir, int p, int q, int k) {
    return dir->h->block_rows[dir->back ? block_index(dir, q, p, k) : block_index(dir, p, q, k)];
}
/* where that block starts in p's outgoing buffer and in q's incoming one */
static int source_offset(const Direction *dir, int p, int q, int k) {
    return dir->back ? dir->h->recv_offset[block_index(dir, p, q, k)]
                     : dir->h->send_offset[block_index(dir, p, q, k)];
}
static int target_offset(const Direction *dir, int p, int q, int k) {
    return dir->back ? dir->h->send_offset[block_index(dir, q, p, k)]
                     : dir->h->recv_offset[block_index(dir, q, p, k)];
}
static int rows_from(const Direction *dir, int p) {
    int rows = 0;
    for (int q = 0; q < dir->P; q++)
        for (int k = 0; k < dir->El; k++) rows += rows_of(dir, p, q, k);
    return rows;
}
static int rows_to(const Direction *dir, int q) {
    int rows = 0;
    for (int p = 0; p < dir->P; p++)
        for (int k = 0; k < dir->El; k++) rows += rows_of(dir, p, q, k);
    return rows;
}

static float *grow(float *buf, size_t floats) {
    float *grown = realloc(buf, sizeof(float) * (floats ? floats : 1));
    if (!grown) {
        fprintf(stderr,
                "moesim: error: out of memory for the hierarchical exchange (%zu floats); "
                "use --moe-token-dispatcher-type alltoall or fewer ranks per node\n",
                floats);
        exit(1); /* mpirun ends the job when a rank exits */
    }
    return grown;
}

static void reserve(Hierarchy *h, size_t floats) {
    if (floats <= h->capacity) return;
    h->gathered = grow(h->gathered, floats);
    h->packed = grow(h->packed, floats);
    h->arrived = grow(h->arrived, floats);
    h->outgoing = grow(h->outgoing, floats);
    h->capacity = floats;
}

/* Step 2 on a leader: the gathered buffers of its ranks (part `mine`)
 * repacked into one message per node, blocks ordered (q, k, p), exchanged
 * among the leaders; arrived holds the messages of every node in order.
 * Each message's bytes go to sent_bytes[EP position of its node's leader]. */
static void exchange_between_nodes(const Direction *dir, int width, int mine,
                                   const int *gathered_at, long *sent_bytes, const Comm *comm) {
    Hierarchy *h = (Hierarchy *)dir->h;
    const int *mm = h->members + h->part_begin[mine];
    int m_count = h->part_begin[mine + 1] - h->part_begin[mine];
    int *send_counts = h->args + 2 * dir->P, *send_displs = send_counts + dir->P;
    int *recv_counts = h->args, *recv_displs = h->args + dir->P;
    size_t off = 0, in = 0;
    for (int part = 0; part < h->parts; part++) {
        const int *qs = h->members + h->part_begin[part];
        int q_count = h->part_begin[part + 1] - h->part_begin[part];
        send_displs[part] = (int)off;
        recv_displs[part] = (int)in;
        for (int a = 0; a < q_count; a++)
            for (int k = 0; k < dir->El; k++)
                for (int b = 0; b < m_count; b++) {
                    int p = mm[b], q = qs[a];
                    size_t n = (size_t)rows_of(dir, p, q, k) * width;
                    memcpy(
                        h->packed + off,
                        h->gathered + gathered_at[b] + (size_t)source_offset(dir, p, q, k) * width,
                        sizeof(float) * n);
                    off += n;
                    /* what part `part` sends here: its ranks to this node's */
                    in += (size_t)rows_of(dir, qs[a], mm[b], k) * width;
                }
        send_counts[part] = (int)(off - send_displs[part]);
        recv_counts[part] = (int)(in - recv_displs[part]);
        sent_bytes[qs[0]] += (long)send_counts[part] * (long)sizeof(float);
    }
    comm_ep_leaders_alltoallv_floats(comm, h->packed, send_counts, send_displs, h->arrived,
                                     recv_counts, recv_displs);
}

/* Step 3 on a leader: every arrived block to its place in the buffer of the
 * rank it is for. Node A's message holds (q of this node, k, p of A). */
static void place_arrived_rows(const Direction *dir, int width, int mine, const int *outgoing_at) {
    Hierarchy *h = (Hierarchy *)dir->h;
    const int *mm = h->members + h->part_begin[mine];
    int m_count = h->part_begin[mine + 1] - h->part_begin[mine];
    size_t in = 0;
    for (int part = 0; part < h->parts; part++) {
        const int *ps = h->members + h->part_begin[part];
        int p_count = h->part_begin[part + 1] - h->part_begin[part];
        for (int b = 0; b < m_count; b++)
            for (int k = 0; k < dir->El; k++)
                for (int a = 0; a < p_count; a++) {
                    int p = ps[a], q = mm[b];
                    size_t n = (size_t)rows_of(dir, p, q, k) * width;
                    memcpy(
                        h->outgoing + outgoing_at[b] + (size_t)target_offset(dir, p, q, k) * width,
                        h->arrived + in, sizeof(float) * n);
                    in += n;
                }
    }
}

static void exchange_through_nodes(Dispatch *d, const float *send, float *recv, int width, int back,
                                   const Comm *comm) {
    Hierarchy *h = &d->h;
    Direction dir = {.h = h, .P = d->ep_size, .El = d->E_local, .back = back};
    int me = comm->ep_rank, mine = h->part_of[me], leader = comm->ep_node_rank == 0;
    const int *mm = h->members + h->part_begin[mine];
    int m_count = h->part_begin[mine + 1] - h->part_begin[mine];
    int *at = h->args + 4 * d->ep_size, *counts = at + d->ep_size;
    size_t gathered = 0, outgoing = 0;
    for (int b = 0; b < m_count; b++) {
        gathered += (size_t)rows_from(&dir, mm[b]) * width;
        outgoing += (size_t)rows_to(&dir, mm[b]) * width;
    }
    if (leader) reserve(h, gathered > outgoing ? gathered : outgoing);
    size_t off = 0;
    for (int b = 0; b < m_count; b++) {
        at[b] = (int)off;
        counts[b] = rows_from(&dir, mm[b]) * width;
        off += (size_t)counts[b];
    }
    double *stage_s = d->times.hierarchical_s[back], t0 = timer_now_s();
    comm_ep_node_gatherv_floats(comm, send, rows_from(&dir, me) * width, h->gathered, counts, at);
    double t1 = timer_now_s();
    if (leader) exchange_between_nodes(&dir, width, mine, at, d->sent_bytes, comm);
    off = 0;
    for (int b = 0; b < m_count; b++) {
        at[b] = (int)off;
        counts[b] = rows_to(&dir, mm[b]) * width;
        off += (size_t)counts[b];
    }
    if (leader) place_arrived_rows(&dir, width, mine, at);
    double t2 = timer_now_s();
    comm_ep_node_scatterv_floats(comm, h->outgoing, counts, at, recv, rows_to(&dir, me) * width);
    double t3 = timer_now_s();
    stage_s[HIER_GATHER] += t1 - t0;
    stage_s[HIER_LEADERS] += t2 - t1;
    stage_s[HIER_SCATTER] += t3 - t2;
}

/* Every rank's counts, the shadow plan, and this rank's received counts
 * without the shadowed blocks. */
static void plan_shadows(Dispatch *d, const int *rows_per_expert_grain, const Comm *comm) {
    int P = d->ep_size, E = d->E, El = d->E_local, grains = d->grains, me = d->ep_rank;
    comm_ep_allgather_ints(comm, rows_per_expert_grain, d->every_count, E * grains);
    for (long b = 0; b < (long)P * E; b++) {
        d->source_rows[b] = 0;
        for (int g = 0; g < grains; g++) d->source_rows[b] += d->every_count[b * grains + g];
    }
    placement_plan_shadows(E, P, d->source_rows, d->shadow_min_gain, d->shadow_max_rows, El,
                           d->load, d->shadow);
    receive_counts_of(d, d->every_count);
    d->num_shadows = d->num_shadow_rows = 0;
    for (int e = 0; e < E; e++)
        if (dispatch_shadowed(d, me, e)) {
            d->num_shadows++;
            d->num_shadow_rows += d->rows_per_expert[e];
        }
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
    double start = timer_now_s();
    d->ep_rank = comm->ep_rank;
    if (d->ep_size == 1)
        memcpy(d->recv_grain_counts, rows_per_expert_grain, sizeof(int) * E * grains);
    else if (d->shadowing)
        plan_shadows(d, rows_per_expert_grain, comm);
    else if (d->hierarchical)
        learn_every_count(d, rows_per_expert_grain, comm);
    else
        comm_ep_alltoall_ints(comm, rows_per_expert_grain, d->recv_grain_counts, El * grains);
    if (d->ep_size > 1) charge_blocking(d, COMM_KIND_DISPATCH, start);
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
 * rows are ordered by source rank. args: send counts, send displacements,
 * receive counts, receive displacements, ep_size each, in floats. */
static void exchange_arguments(const Dispatch *d, int j, int width, int *args) {
    int P = d->ep_size, owner_offset = 0;
    int *send_counts = args, *send_displs = args + P, *recv_counts = args + 2 * P,
        *recv_displs = args + 3 * P;
    Placement place = {.num_experts = d->E, .ep_size = P};
    for (int s = 0; s < P; s++) {
        int e = placement_global_expert(&place, s, j);
        send_counts[s] = dispatch_shadowed(d, d->ep_rank, e)
                             ? 0
                             : (d->send_row_begin[e + 1] - d->send_row_begin[e]) * width;
        send_displs[s] = d->send_row_begin[e] * width;
        recv_counts[s] = d->recv_counts[s * d->E_local + j] * width;
        recv_displs[s] = owner_offset;
        owner_offset += recv_counts[s];
    }
}

/* Bytes of counts[ep_size] floats to each EP position. */
static void add_sent_floats(Dispatch *d, const int *counts) {
    for (int s = 0; s < d->ep_size; s++) d->sent_bytes[s] += (long)counts[s] * (long)sizeof(float);
}

void dispatch_rows(Dispatch *d, const float *send, float *recv, int width, const Comm *comm) {
    if (d->ep_size == 1) {
        memcpy(recv, send, sizeof(float) * (size_t)d->num_send_rows * width);
        d->sent_bytes[0] += (long)d->num_send_rows * width * (long)sizeof(float);
        return;
    }
    double start = timer_now_s();
    if (d->hierarchical) {
        exchange_through_nodes(d, send, recv, width, 0, comm);
    } else {
        int P = d->ep_size, *args = d->args;
        for (int j = 0; j < d->E_local; j++) {
            exchange_arguments(d, j, width, args);
            add_sent_floats(d, args);
            comm_ep_alltoallv_floats(comm, send, args, args + P,
                                     recv + (size_t)d->expert_row_begin[j] * width, args + 2 * P,
                                     args + 3 * P);
        }
    }
    charge_blocking(d, COMM_KIND_DISPATCH, start);
}

void combine_rows(Dispatch *d, const float *owner, float *back, int width, const Comm *comm) {
    if (d->ep_size == 1) {
        memcpy(back, owner, sizeof(float) * (size_t)d->num_recv_rows * width);
        d->sent_bytes[0] += (long)d->num_recv_rows * width * (long)sizeof(float);
        return;
    }
    double start = timer_now_s();
    if (d->hierarchical) {
        exchange_through_nodes(d, owner, back, width, 1, comm);
    } else {
        int P = d->ep_size, *args = d->args;
        for (int j = 0; j < d->E_local; j++) {
            exchange_arguments(d, j, width, args);
            add_sent_floats(d, args + 2 * P);
            /* Reverse direction: what was received is sent back to where it came from. */
            comm_ep_alltoallv_floats(comm, owner + (size_t)d->expert_row_begin[j] * width,
                                     args + 2 * P, args + 3 * P, back, args, args + P);
        }
    }
    charge_blocking(d, COMM_KIND_COMBINE, start);
}

int dispatch_rows_to(const Dispatch *d, int s) {
    Placement place = {.num_experts = d->E, .ep_size = d->ep_size};
    int rows = 0;
    for (int j = 0; j < d->E_local; j++) {
        int e = placement_global_expert(&place, s, j);
        if (!dispatch_shadowed(d, d->ep_rank, e))
            rows += d->send_row_begin[e + 1] - d->send_row_begin[e];
    }
    return rows;
}

void dispatch_add_bytes_to_ranks(const Dispatch *d, int width, long *bytes) {
    for (int s = 0; s < d->ep_size; s++)
        bytes[s] += (long)dispatch_rows_to(d, s) * width * (long)sizeof(float);
}

/* ---- overlap: one local expert at a time, without blocking ------------------- */

static int *async_args_of(const Dispatch *d, int direction, int j) {
    return d->async_args + ((size_t)direction * d->E_local + j) * 4 * d->ep_size;
}

/* Requests of direction 0 (dispatch) or 1 (combine): E_local each. A
 * request is in flight from just before its start until its completion is
 * seen (comm sets it to MPI_REQUEST_NULL); per direction, in_flight_s adds
 * the stretches during which at least one is. */
static MPI_Request *requests_of(Dispatch *d, int direction) {
    return d->requests + (size_t)direction * d->E_local;
}

static enum CommKind kind_of(int direction) {
    return direction == 0 ? COMM_KIND_DISPATCH : COMM_KIND_COMBINE;
}

static void note_start(Dispatch *d, int direction, double now) {
    if (d->outstanding[direction]++ == 0) d->busy_since[direction] = now;
}

static void note_completions(Dispatch *d, int direction, double now) {
    const MPI_Request *req = requests_of(d, direction);
    int left = 0;
    for (int j = 0; j < d->E_local; j++) left += req[j] != MPI_REQUEST_NULL;
    if (d->outstanding[direction] > 0 && left == 0)
        d->times.in_flight_s[kind_of(direction)] += now - d->busy_since[direction];
    d->outstanding[direction] = left;
}

/* Waits for one request, exposed time only while it was still in flight. */
static void wait_request(Dispatch *d, int direction, int j) {
    MPI_Request *req = &requests_of(d, direction)[j];
    if (*req == MPI_REQUEST_NULL) return;
    double start = timer_now_s();
    comm_wait(req);
    double now = timer_now_s();
    d->times.exposed_s[kind_of(direction)] += now - start;
    note_completions(d, direction, now);
}

void dispatch_expert_start(Dispatch *d, int j, const float *send, float *recv, int width,
                           const Comm *comm) {
    int P = d->ep_size, *args = async_args_of(d, 0, j);
    exchange_arguments(d, j, width, args);
    add_sent_floats(d, args);
    double start = timer_now_s();
    note_start(d, 0, start);
    comm_ep_ialltoallv_floats(comm, send, args, args + P,
                              recv + (size_t)d->expert_row_begin[j] * width, args + 2 * P,
                              args + 3 * P, &d->requests[j]);
    d->times.exposed_s[COMM_KIND_DISPATCH] += timer_now_s() - start;
}

void dispatch_expert_wait(Dispatch *d, int j) {
    wait_request(d, 0, j);
}

void combine_expert_start(Dispatch *d, int j, const float *owner, float *back, int width,
                          const Comm *comm) {
    int P = d->ep_size, *args = async_args_of(d, 1, j);
    exchange_arguments(d, j, width, args);
    add_sent_floats(d, args + 2 * P);
    double start = timer_now_s();
    note_start(d, 1, start);
    comm_ep_ialltoallv_floats(comm, owner + (size_t)d->expert_row_begin[j] * width, args + 2 * P,
                              args + 3 * P, back, args, args + P, &d->requests[d->E_local + j]);
    d->times.exposed_s[COMM_KIND_COMBINE] += timer_now_s() - start;
}

void combine_wait_all(Dispatch *d) {
    for (int j = 0; j < d->E_local; j++) wait_request(d, 1, j);
}

void dispatch_progress(void *arg) {
    Dispatch *d = arg;
    if (d->outstanding[0] + d->outstanding[1] > 0) {
        comm_test_all(d->requests, 2 * d->E_local);
        double now = timer_now_s();
        note_completions(d, 0, now);
        note_completions(d, 1, now);
    }
    if (d->outer_progress) d->outer_progress(d->outer_progress_arg);
}
