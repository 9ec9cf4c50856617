"""Video experiments of the paper: training harness, demo and report (``kcprnn train|demo|report``)."""
