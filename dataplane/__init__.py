"""kvroute node dataplane: eBPF programs, the agent that owns them, and the CLI."""
