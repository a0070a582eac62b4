"""zinfer's shared package: wire protocol, model schema, config, logging, transport and the client."""
