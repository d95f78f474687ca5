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
