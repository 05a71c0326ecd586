"""Studies of the machine's timing noise, not of the product: what a verdict on a shared VM can and cannot
show."""
