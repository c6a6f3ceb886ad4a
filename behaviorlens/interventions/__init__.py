"""One intervention model: each edit kind, readout and patch as a small class that acts
inside an nnsight trace (every backend) and shares its tensor math with the local hooks."""
