# Makes the R lazy-load database fixtures that tests/lab/test_data.py reads (run from this directory):
#   Rscript make_fixtures.R
# Written with R 4.2.2; the expected values in the tests are the literals below.
db <- new.env()
assign("letters3", c("a", "b", "c"), envir = db)
assign("squares", (1:4)^2, envir = db)
tools:::makeLazyLoadDB(db, "db_zlib", compress = TRUE)
tools:::makeLazyLoadDB(db, "db_xz", compress = 3)
