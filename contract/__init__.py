"""The model repository contract, shared by the writer (training) and the reader (service) and
importing neither: where a repository keeps what (`layout`), what a version promises
(`manifest`), how its files are checked (`integrity`), what its answers mean as numbers
(`scores`), and the file rules every process that shares a repository follows (`files`,
`held_folders`)."""
