"""A one-machine lab of network namespaces: GPU pods, clients, engines and traffic."""
