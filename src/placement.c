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
