"""sweep_lib: the pieces of experiments/sweep.

    spec     reads a sweep spec (INI) into named points with merged moesim configs
    launch   builds a point's mpirun/srun command and runs it with a timeout,
             leaving no process behind
    records  a run record's status and the sweep's index.csv
"""
