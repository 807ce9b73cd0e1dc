"""Model catalog: the models directory, built-in models and where to fetch them."""
