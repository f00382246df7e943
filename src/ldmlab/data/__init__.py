"""WebDataset pipelines, transforms, demo data and DataModules."""
