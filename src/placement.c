#include "moesim/placement.h"

Placement placement_of_rank(int num_experts, int ep_size, int world_rank) {
    return (Placement){.num_experts = num_experts,
                       .ep_size = ep_size,
                       .ep_rank = placement_ep_position(ep_size, world_rank)};
}

int placement_ep_group(int ep_size, int world_rank) {
    return world_rank / ep_size;
}

int placement_ep_position(int ep_size, int world_rank) {
    return world_rank % ep_size;
}

int placement_experts_per_rank(const Placement *p) {
    return p->num_experts / p->ep_size;
}

int placement_owner(const Placement *p, int expert) {
    return expert / placement_experts_per_rank(p);
}

int placement_global_expert(const Placement *p, int ep_rank, int j) {
    return ep_rank * placement_experts_per_rank(p) + j;
}

int placement_first_local_expert(const Placement *p) {
    return placement_global_expert(p, p->ep_rank, 0);
}

double placement_load_imbalance(const long *rows_per_expert, int layers, int num_experts,
                                int ep_size) {
    if (ep_size <= 1 || layers <= 0) return 1.0;
    Placement p = {.num_experts = num_experts, .ep_size = ep_size};
    double sum = 0.0;
    for (int l = 0; l < layers; l++) {
        const long *rows = rows_per_expert + (long)l * num_experts;
        double busiest = 0.0, total = 0.0;
        for (int position = 0; position < ep_size; position++) {
            double held = 0.0;
            for (int j = 0; j < placement_experts_per_rank(&p); j++)
                held += (double)rows[placement_global_expert(&p, position, j)];
            busiest = held > busiest ? held : busiest;
            total += held;
        }
        sum += total > 0.0 ? busiest * ep_size / total : 1.0;
    }
    return sum / layers;
}

static int busiest_position(const int *load, int ep_size) {
    int busiest = 0;
    for (int q = 1; q < ep_size; q++)
        if (load[q] > load[busiest]) busiest = q;
    return busiest;
}

static int shadows_of(const unsigned char *shadow, int num_experts, int q) {
    int n = 0;
    for (int e = 0; e < num_experts; e++) n += shadow[(long)q * num_experts + e];
    return n;
}

/* How much shadowing block (q, e) lowers the busiest position p's rows: 0
 * when the block is empty, taken, over the row limit, or would not help. */
static int shadow_gain(const int *rows, const int *load, const unsigned char *shadow, int E, int p,
                       int q, int e, int max_rows) {
    int n = rows[(long)q * E + e];
    if (n == 0 || shadow[(long)q * E + e] || load[q] + n > max_rows) return 0;
    int after = load[p] - n > load[q] + n ? load[p] - n : load[q] + n;
    return load[p] - after;
}

int placement_plan_shadows(int num_experts, int ep_size, const int *rows, int min_gain,
                           int max_rows, int max_per_rank, int *load, unsigned char *shadow) {
    int E = num_experts, taken = 0;
    Placement place = {.num_experts = E, .ep_size = ep_size};
    for (int p = 0; p < ep_size; p++) {
        load[p] = 0;
        for (int q = 0; q < ep_size; q++)
            for (int j = 0; j < placement_experts_per_rank(&place); j++)
                load[p] += rows[(long)q * E + placement_global_expert(&place, p, j)];
    }
    for (long i = 0; i < (long)ep_size * E; i++) shadow[i] = 0;
    if (min_gain < 1) min_gain = 1;
    for (;;) {
        /* ties: the lowest source, then the lowest expert */
        int p = busiest_position(load, ep_size), best = 0, best_q = -1, best_e = -1;
        for (int q = 0; q < ep_size; q++) {
            if (q == p || shadows_of(shadow, E, q) >= max_per_rank) continue;
            for (int j = 0; j < placement_experts_per_rank(&place); j++) {
                int e = placement_global_expert(&place, p, j);
                int gain = shadow_gain(rows, load, shadow, E, p, q, e, max_rows);
                if (gain > best) best = gain, best_q = q, best_e = e;
            }
        }
        if (best < min_gain) return taken;
        int n = rows[(long)best_q * E + best_e];
        shadow[(long)best_q * E + best_e] = 1;
        load[p] -= n;
        load[best_q] += n;
        taken++;
    }
}
