"""Lightning callbacks: ``convergence`` (stops a lasso solve by its duality-gap certificate) and
``neuron_sharing_figure`` (the paper's neuron-sharing figure and neuron counts of a run)."""
