//! Rows to Parquet bytes: one row group per file, snappy-compressed, the table's
//! schema embedded (readers get the Arrow types back, timestamps in UTC).

use parquet::arrow::ArrowWriter;
use parquet::basic::Compression;
use parquet::file::properties::WriterProperties;

use super::rows::Rows;

/// Why rows could not be written as Parquet (a bug, not an I/O condition: the bytes
/// go to memory).
#[derive(Debug, thiserror::Error)]
pub enum WriteError {
    #[error("building the {table} columns: {source}")]
    Arrow {
        table: &'static str,
        source: arrow_schema::ArrowError,
    },
    #[error("encoding {table} as Parquet: {source}")]
    Parquet {
        table: &'static str,
        source: parquet::errors::ParquetError,
    },
}

/// The Parquet file holding `rows`.
pub fn to_parquet(rows: &Rows) -> Result<Vec<u8>, WriteError> {
    let table = rows.table().dir();
    let batch = rows
        .to_batch()
        .map_err(|source| WriteError::Arrow { table, source })?;
    let props = WriterProperties::builder()
        .set_compression(Compression::SNAPPY)
        .set_created_by(concat!("vitalmq ", env!("CARGO_PKG_VERSION")).to_owned())
        .build();
    let parquet = |source| WriteError::Parquet { table, source };
    let mut out = Vec::new();
    let mut writer =
        ArrowWriter::try_new(&mut out, batch.schema(), Some(props)).map_err(parquet)?;
    writer.write(&batch).map_err(parquet)?;
    writer.close().map_err(parquet)?;
    Ok(out)
}

#[cfg(test)]
mod tests {
    use bytes::Bytes;
    use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;

    use super::*;
    use crate::surveillance::Table;
    use crate::surveillance::rows::{RefusalRow, schema};

    #[test]
    fn a_file_reads_back_with_its_schema_and_rows() {
        let rows = Rows::Refusals(vec![
            RefusalRow {
                at: Some(1),
                device: Some("dev-1".into()),
                reason: Some("bad_signature".into()),
                ..RefusalRow::default()
            };
            3
        ]);
        let bytes = to_parquet(&rows).expect("parquet");
        let reader = ParquetRecordBatchReaderBuilder::try_new(Bytes::from(bytes))
            .expect("reader")
            .build()
            .expect("build");
        let batches: Vec<_> = reader.collect::<Result<_, _>>().expect("read");
        assert_eq!(batches.iter().map(|b| b.num_rows()).sum::<usize>(), 3);
        assert_eq!(batches[0].schema(), schema(Table::Refusals));
    }
}
