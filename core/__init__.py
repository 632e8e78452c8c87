"""What every engine and adapter shares: runtime (distributed, device, precision), schedules, atomic writes,
run directories, configurations and the one error base class. It imports nothing else of ours."""
