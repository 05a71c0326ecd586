"""Studies of the machine's timing noise (not of the product): what a verdict on a shared 2-core VM can and cannot show."""
